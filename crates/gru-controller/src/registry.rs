//! What the controller knows: fleets, minions, and the events between them.
//!
//! All of it sits behind one mutex that is never held across an `.await`:
//! the reconcile loop takes a plan out ([`Registry::plan`]), does the slow
//! cloud calls without the lock, and comes back to record what happened.
//! Every state change goes through [`gru_core::step`].

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gru_cloud::{GroupState, InstanceId, InstanceLifecycle, Target};
use gru_core::forecast::HistoryMemory;
use gru_core::lifecycle::InvalidTransition;
use gru_core::plan::{
    Change, CloudView, DrainIntent, GroupSize, HookView, Limits, Listed, MinionSnapshot,
};
use gru_core::policy::{
    self, Decision, Explanation, ExternalSignal, MinionLoad, Observation, Overrides, Pin,
    PinStatus, PolicyMemory, PolicyState, Source,
};
use gru_core::{DrainPhase, error_chain};
use gru_core::{LifecycleEvent, Load, MinionState, step};
use jiff::Timestamp;
use rand::Rng;
use tokio::sync::{broadcast, mpsc};

use crate::config::FleetConfig;
use crate::metrics::{FleetMetrics, FleetPicture};
use crate::store::{
    DrainRow, EventRow, FleetRow, HistoryRow, Loaded, MinionRow, Origin, PinRow, Store, StoreError,
};

/// How long after a restart or a takeover the silence of a resumed minion
/// starts to count: the agent's HTTP/2 keepalive interval plus its timeout
/// (gru_minion's `KEEPALIVE_INTERVAL` + `KEEPALIVE_TIMEOUT`), the longest
/// it takes to notice that the controller its Session was on stalled
/// without closing the connection.
pub const RESUME_GRACE: std::time::Duration = std::time::Duration::from_secs(10);
/// How many events `gru events` shows without `--since`.
pub const RECENT_EVENTS: usize = 500;
/// How many transitions `gru minion get` shows.
pub const MINION_HISTORY: usize = 200;
/// The policy's memory changes with every decision; it is written at most
/// this often (and whenever a scale-out or scale-in is recorded).
pub const POLICY_SAVE_EVERY: Duration = Duration::from_secs(15);
/// How often a fleet's demand history (up to 8 days in 5-minute buckets,
/// tens of KB) is written when it changed: once per bucket.
pub const HISTORY_SAVE_EVERY: Duration = gru_core::forecast::BUCKET;
/// Gone minions are listed for this long, then forgotten.
pub const GONE_RETENTION: Duration = Duration::from_secs(3600);
/// On AWS, a minion that reported queued or in-flight work within this is
/// protected from the group's own scale-ins (so those pick idle instances);
/// the window keeps protection from flapping with every report.
pub const PROTECT_AFTER_WORK: Duration = Duration::from_secs(60);
/// How long after a decrement claim that was never confirmed the group's
/// view is trusted to show whether the call took effect (AWS's describe
/// calls catch up within seconds).
pub const CLAIM_SETTLE: Duration = Duration::from_secs(60);

/// What the decrement ledger allows a terminate call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecrementClaim {
    /// Claimed now: the call decrements.
    Claimed,
    /// The decrement already happened: the call (if any) must not decrement.
    Done,
    /// An earlier claim is unresolved: make no call yet.
    Wait,
}

/// A Terminating minion whose instance the group still runs after this is
/// terminated again (idempotent; the decrement ledger allows one decrement).
pub const TERMINATE_RETRY_AFTER: Duration = Duration::from_secs(30);

/// A command for a minion's agent, sent down its Session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Drain {
        deadline: Duration,
        reason: String,
    },
    Resume,
    /// Close this many connections at message boundaries (rebalancing).
    Shed {
        count: u64,
        reason: String,
    },
    /// A renewed client certificate, the answer to the minion's request.
    Certificate(crate::pki::MinionCertificate),
}

pub type CommandSender = mpsc::Sender<Result<Command, tonic::Status>>;

/// The last report of a minion's agent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub seq: u64,
    pub queue_depth: u64,
    pub in_flight: u64,
    pub processed_total: u64,
    pub failed_total: u64,
    pub open_connections: u64,
    pub healthy: bool,
    pub draining: bool,
    pub drained: bool,
    /// The engine closes connections when asked ([`Command::Shed`]).
    pub can_shed: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Transition,
    /// A decision that changed the desired size.
    Decision,
    Scale,
    Step,
    Warning,
    /// An operator's action, with who made it.
    Admin,
    /// Something refused for trust: a Join whose proof did not hold.
    Security,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Transition => "transition",
            EventKind::Decision => "decision",
            EventKind::Scale => "scale",
            EventKind::Step => "step",
            EventKind::Warning => "warning",
            EventKind::Admin => "admin",
            EventKind::Security => "security",
        }
    }

    fn parse(s: &str) -> EventKind {
        match s {
            "transition" => EventKind::Transition,
            "decision" => EventKind::Decision,
            "scale" => EventKind::Scale,
            "warning" => EventKind::Warning,
            "admin" => EventKind::Admin,
            "security" => EventKind::Security,
            _ => EventKind::Step,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Event {
    pub at: SystemTime,
    pub fleet: String,
    pub minion: Option<String>,
    pub kind: EventKind,
    pub message: String,
    pub transition: Option<(MinionState, MinionState)>,
    /// Who caused it, for admin actions (as far as the controller knows).
    pub actor: Option<String>,
}

#[derive(Clone, Debug)]
pub struct HistoryEntry {
    pub from: MinionState,
    pub to: MinionState,
    pub at: SystemTime,
    pub reason: String,
}

/// A drain on record: why, and whether the group's desired capacity goes
/// down with it. Its phase is the minion's state
/// ([`MinionState::Draining`]).
#[derive(Clone, Debug)]
pub struct DrainPlan {
    /// Lower the group's desired capacity when terminating (scale-in), or not
    /// (replacement).
    pub decrement: bool,
    pub reason: String,
    pub overdue_reported: bool,
}

#[derive(Debug)]
pub struct SessionLink {
    pub generation: u64,
    pub tx: CommandSender,
    /// Reports within one Session carry increasing sequence numbers.
    pub last_seq: u64,
}

#[derive(Debug)]
pub struct MinionRecord {
    pub id: String,
    pub fleet: String,
    pub instance: InstanceId,
    /// Changed only by [`Registry::transition`], through the step function.
    state: MinionState,
    pub state_since: Instant,
    pub created: Instant,
    pub engine_address: Option<SocketAddr>,
    /// Where the agent serves its metrics, as it said at its last join (not
    /// stored: an agent joins again after any reconnect).
    pub metrics_address: Option<SocketAddr>,
    pub session_token: Option<String>,
    pub session: Option<SessionLink>,
    pub last_report: Option<Report>,
    /// Last sign of life: join, session start or report.
    pub last_seen: Option<Instant>,
    pub last_report_at: Option<Instant>,
    /// Messages per second processed between the last two reports.
    pub rate_per_s: Option<f64>,
    pub drain: Option<DrainPlan>,
    pub registered: bool,
    pub history: Vec<HistoryEntry>,
    pub lb_connections_at_deregistration: Option<u64>,
    pub lb_connections_at_drain_start: Option<u64>,
    /// When the load balancer first sent the target no new connections. On
    /// AWS the wait for `unused` ends one deregistration delay after this:
    /// by then the load balancer has cut whatever connections were left.
    pub deregistered_at: Option<Instant>,
    /// Last lifecycle action heartbeat for the terminating hook holding the
    /// instance (AWS); `None` until the first one.
    pub hook_heartbeat_at: Option<Instant>,
    /// The launching hook's action was completed with CONTINUE (AWS), so it
    /// is not asked again while the group's view catches up.
    pub launch_completed: bool,
    /// The terminating hook's action was completed (AWS), likewise.
    pub termination_completed: bool,
    /// Last report with queued or in-flight work.
    pub last_busy_at: Option<Instant>,
    /// Found InService by a restarted controller: register it once more
    /// (idempotent) in case the load balancer lost it (a local one starts
    /// empty).
    pub verify_registration: bool,
    /// Last asked to shed connections (rebalancing); not kept across a
    /// restart (the worst is one ask a cooldown early).
    pub shed_at: Option<Instant>,
}

impl MinionRecord {
    /// Where the minion is in its lifecycle.
    pub fn state(&self) -> MinionState {
        self.state
    }

    pub fn target(&self) -> Option<Target> {
        self.engine_address.map(|address| Target {
            instance: self.instance.clone(),
            address,
        })
    }

    pub fn load(&self) -> Load {
        self.last_report
            .map(|r| Load {
                queue_depth: r.queue_depth,
                in_flight: r.in_flight,
            })
            .unwrap_or_default()
    }
}

/// A fleet's mutable state; its config and providers live in `FleetRuntime`.
#[derive(Debug)]
pub struct FleetState {
    pub config: FleetConfig,
    /// Paused by an operator: who and when.
    pub paused: Option<Origin>,
    pub pin: Option<PinOverride>,
    pub policy_state: PolicyState,
    /// The policy memory last written to the store, and when (its history
    /// apart, in `history_saved`).
    pub policy_saved: Option<(Instant, PolicyMemory)>,
    /// The demand history last written to the store, and when.
    pub history_saved: Option<(Instant, HistoryMemory)>,
    pub last_decision: Option<Decision>,
    pub group: Option<GroupState>,
    /// What only an AWS group shows: instances held by lifecycle hooks, in
    /// service, protected. `None` for other providers (and before the first
    /// AWS pass).
    pub aws: Option<AwsView>,
    /// What the controller learnt about an AWS fleet at its first pass.
    pub aws_setup: Option<AwsSetup>,
    /// The fleet's counters; detached until a controller hands its own.
    pub metrics: FleetMetrics,
}

/// An operator's pin and who set it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinOverride {
    pub pin: Pin,
    pub origin: Origin,
}

/// The lifecycle hook wait states of an AWS group's instances, from the
/// last describe.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AwsView {
    /// Held in `Pending:Wait` by the launching hook until the controller
    /// completes the action: CONTINUE once the minion is ready, ABANDON if it
    /// never joins.
    pub pending_wait: HashSet<InstanceId>,
    /// Held in `Terminating:Wait` by the terminating hook: the group (or the
    /// controller's own terminate) started the termination; the controller
    /// drains the minion, heartbeats, then completes with CONTINUE.
    pub terminating_wait: HashSet<InstanceId>,
    /// In service in the group (lifecycle `InService`).
    pub in_service: HashSet<InstanceId>,
    /// Protected from the group's own scale-ins.
    pub protected: HashSet<InstanceId>,
}

/// Read once per AWS fleet, at its first successful pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AwsSetup {
    /// The target group is attached to the Auto Scaling group, which then
    /// registers and deregisters instances itself: the controller skips both.
    pub target_group_attached: bool,
    /// The target group's deregistration delay: the longest a drained
    /// minion waits for its target to be `unused`.
    pub deregistration_delay: Duration,
}

pub use gru_core::plan::{Action, Finish};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("unknown fleet {0:?}")]
    UnknownFleet(String),
    #[error("no minion {0:?}")]
    UnknownMinion(String),
    #[error(transparent)]
    Transition(#[from] InvalidTransition),
}

pub struct Registry {
    fleets: BTreeMap<String, FleetState>,
    minions: BTreeMap<String, MinionRecord>,
    by_instance: HashMap<InstanceId, String>,
    events: broadcast::Sender<Event>,
    next_generation: u64,
    store: Arc<dyn Store>,
    /// The decrement ledger of this registry's fleets, as in the store: by
    /// instance, when the decrement was claimed and whether it was
    /// confirmed.
    ledger: HashMap<String, (Instant, bool)>,
    /// The same moment on the monotonic clock and the wall clock: the store
    /// keeps wall-clock milliseconds, the registry `Instant`s.
    anchor: (Instant, SystemTime),
}

impl Registry {
    /// The registry of `fleets`, resumed from `loaded` (what `store` holds
    /// of these fleets): minions
    /// with their ids, states and drains, each fleet's overrides and policy
    /// memory. Pins that expired while the controller was down are dropped
    /// with an event.
    pub fn open(
        fleets: &[FleetConfig],
        events: broadcast::Sender<Event>,
        store: Arc<dyn Store>,
        loaded: Loaded,
        now: Instant,
    ) -> Result<Self, StoreError> {
        let fleets = fleets
            .iter()
            .map(|c| {
                let state = FleetState {
                    config: c.clone(),
                    paused: None,
                    pin: None,
                    policy_state: PolicyState::new(),
                    policy_saved: None,
                    history_saved: None,
                    last_decision: None,
                    group: None,
                    aws: None,
                    aws_setup: None,
                    metrics: FleetMetrics::detached(&c.name),
                };
                (c.name.clone(), state)
            })
            .collect();
        let mut reg = Registry {
            fleets,
            minions: BTreeMap::new(),
            by_instance: HashMap::new(),
            events,
            next_generation: 1,
            store,
            ledger: HashMap::new(),
            anchor: (now, SystemTime::now()),
        };
        reg.resume(loaded, now)?;
        Ok(reg)
    }

    /// Wall-clock milliseconds of `t`.
    fn wall_ms(&self, t: Instant) -> i64 {
        let (at, wall) = self.anchor;
        let wall = if t >= at {
            wall + (t - at)
        } else {
            wall.checked_sub(at - t).unwrap_or(UNIX_EPOCH)
        };
        unix_ms(wall)
    }

    /// The `Instant` of wall-clock milliseconds `ms` (never after `now`).
    fn instant_at(&self, ms: i64, now: Instant) -> Instant {
        let (at, wall) = self.anchor;
        let then = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
        let t = match then.duration_since(wall) {
            Ok(ahead) => at.checked_add(ahead).unwrap_or(now),
            Err(e) => at.checked_sub(e.duration()).unwrap_or(at),
        };
        t.min(now)
    }

    fn resume(&mut self, loaded: Loaded, now: Instant) -> Result<(), StoreError> {
        for row in loaded.minions {
            if !self.fleets.contains_key(&row.fleet) {
                continue;
            }
            let Some(state) = MinionState::parse(&row.state) else {
                return Err(StoreError::Decode {
                    path: self.store.location(),
                    what: format!("minion {}", row.id),
                    detail: format!("unknown state {:?}", row.state),
                });
            };
            let history = self
                .store
                .minion_events(&row.id, MINION_HISTORY)?
                .into_iter()
                .filter_map(|e| {
                    let from = MinionState::parse(e.from.as_deref()?)?;
                    let to = MinionState::parse(e.to.as_deref()?)?;
                    // The event says "from → to: reason"; history keeps the reason.
                    let prefix = format!("{from} → {to}: ");
                    let reason = e
                        .message
                        .strip_prefix(&prefix)
                        .map_or_else(|| e.message.clone(), str::to_owned);
                    Some(HistoryEntry {
                        from,
                        to,
                        at: UNIX_EPOCH + Duration::from_millis(e.at_ms.max(0) as u64),
                        reason,
                    })
                })
                .collect();
            let instance = InstanceId(row.instance.clone());
            let record = MinionRecord {
                id: row.id.clone(),
                fleet: row.fleet.clone(),
                instance: instance.clone(),
                state,
                state_since: self.instant_at(row.state_since_ms, now),
                created: self.instant_at(row.created_ms, now),
                engine_address: row.engine_address.as_deref().and_then(|a| a.parse().ok()),
                metrics_address: None,
                session_token: None,
                session: None,
                last_report: None,
                // Silence is counted from the restart, plus the time an
                // agent takes to notice that the controller it was talking
                // to stalled (a failover from a hung leader): an agent gets
                // that and a whole lost timeout to reconnect.
                last_seen: Some(now + RESUME_GRACE),
                last_report_at: None,
                rate_per_s: None,
                drain: row.drain.map(|d| DrainPlan {
                    decrement: d.decrement,
                    reason: d.reason,
                    overdue_reported: d.overdue_reported,
                }),
                registered: row.registered,
                history,
                lb_connections_at_deregistration: None,
                lb_connections_at_drain_start: None,
                deregistered_at: row.deregistered_ms.map(|ms| self.instant_at(ms, now)),
                hook_heartbeat_at: row.hook_heartbeat_ms.map(|ms| self.instant_at(ms, now)),
                launch_completed: row.launch_completed,
                termination_completed: row.termination_completed,
                last_busy_at: None,
                verify_registration: state == MinionState::InService && row.registered,
                shed_at: None,
            };
            self.by_instance.insert(instance, row.id.clone());
            self.minions.insert(row.id, record);
        }
        for row in loaded.ledger {
            let asked = self.instant_at(row.asked_ms, now);
            self.ledger
                .insert(row.instance, (asked, row.confirmed_ms.is_some()));
        }
        let wall_now = jiff::Timestamp::from_millisecond(self.wall_ms(now)).unwrap_or_default();
        let mut expired = Vec::new();
        let mut histories: HashMap<String, HistoryMemory> = loaded
            .histories
            .into_iter()
            .filter_map(|h| Some((h.name, decode_history(&h.history)?)))
            .collect();
        for row in loaded.fleets {
            let Some(f) = self.fleets.get_mut(&row.name) else {
                continue;
            };
            f.paused = row.paused;
            f.pin = row.pin.map(|p| PinOverride {
                pin: Pin {
                    desired: p.desired,
                    until: p
                        .until_ms
                        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok()),
                },
                origin: p.origin,
            });
            if let Some(p) = &f.pin
                && p.pin.until.is_some_and(|until| until <= wall_now)
            {
                expired.push((row.name.clone(), p.pin));
                f.pin = None;
            }
            let history = histories.remove(&row.name);
            let memory = decode_policy_memory(&row.policy_memory);
            if memory.is_some() || history.is_some() {
                let mut memory = memory.unwrap_or_default();
                memory.history = history.clone().unwrap_or_default();
                f.policy_state = PolicyState::from_memory(memory);
                f.history_saved = history.map(|h| (now, h));
            }
        }
        let resumed = self.minions.len();
        for (fleet, pin) in expired {
            let until = pin.until.map(|t| t.to_string()).unwrap_or_default();
            self.emit(
                &fleet,
                None,
                EventKind::Scale,
                format!(
                    "pin at {} expired at {until} while the controller was down: dropped",
                    pin.desired
                ),
            );
            self.persist_fleet(&fleet);
        }
        if resumed > 0 {
            tracing::info!(minions = resumed, "resumed from the store");
        }
        Ok(())
    }

    /// Writes what the store keeps of minion `id`. A failed write is logged
    /// and retried with the minion's next change; the intents that guard
    /// cloud calls are written with [`Registry::claim_decrement`], whose
    /// failure stops the call.
    pub fn persist(&self, id: &str) {
        if let Some(row) = self.minion_row(id) {
            self.store_write(|s| s.put_minion(&row));
        }
    }

    /// What the store keeps of minion `id`.
    fn minion_row(&self, id: &str) -> Option<MinionRow> {
        let m = self.minions.get(id)?;
        Some(MinionRow {
            id: m.id.clone(),
            fleet: m.fleet.clone(),
            instance: m.instance.0.clone(),
            state: m.state.as_str().to_owned(),
            state_since_ms: self.wall_ms(m.state_since),
            created_ms: self.wall_ms(m.created),
            engine_address: m.engine_address.map(|a| a.to_string()),
            registered: m.registered,
            drain: m.drain.as_ref().map(|d| DrainRow {
                decrement: d.decrement,
                reason: d.reason.clone(),
                overdue_reported: d.overdue_reported,
            }),
            launch_completed: m.launch_completed,
            termination_completed: m.termination_completed,
            hook_heartbeat_ms: m.hook_heartbeat_at.map(|t| self.wall_ms(t)),
            deregistered_ms: m.deregistered_at.map(|t| self.wall_ms(t)),
        })
    }

    /// Writes fleet `name`'s overrides and policy memory.
    pub fn persist_fleet(&mut self, name: &str) {
        let Some(f) = self.fleets.get_mut(name) else {
            return;
        };
        let memory = f.policy_state.memory();
        let row = FleetRow {
            name: name.to_owned(),
            paused: f.paused.clone(),
            pin: f.pin.as_ref().map(|p| PinRow {
                desired: p.pin.desired,
                until_ms: p.pin.until.map(|t| t.as_millisecond()),
                origin: p.origin.clone(),
            }),
            policy_memory: encode_policy_memory(&memory),
        };
        let store = self.store.clone();
        if let Err(e) = store.put_fleet(&row) {
            tracing::error!(fleet = %name, error = %error_chain(&e), "failed to write the fleet to the store");
        }
    }

    /// Writes fleet `name`'s demand history.
    pub fn persist_history(&mut self, name: &str, now: Instant) {
        let Some(f) = self.fleets.get_mut(name) else {
            return;
        };
        let history = f.policy_state.history().memory();
        let row = HistoryRow {
            name: name.to_owned(),
            history: encode_history(&history),
        };
        match self.store.put_fleet_history(&row) {
            Ok(()) => f.history_saved = Some((now, history)),
            Err(e) => {
                tracing::error!(fleet = %name, error = %error_chain(&e), "failed to write the fleet's demand history to the store");
            }
        }
    }

    /// Writes the policy's memory when it changed, at most every
    /// [`POLICY_SAVE_EVERY`] (it changes with every decision), and its
    /// demand history at most every [`HISTORY_SAVE_EVERY`] (it is large
    /// and a lost bucket or two only blurs a forecast).
    fn maybe_persist_policy(&mut self, name: &str, now: Instant) {
        let Some(f) = self.fleets.get_mut(name) else {
            return;
        };
        let mut memory = f.policy_state.memory();
        let history = std::mem::take(&mut memory.history);
        let history_due = match &f.history_saved {
            None => !history.means.is_empty(),
            Some((at, saved)) => {
                *saved != history && now.saturating_duration_since(*at) >= HISTORY_SAVE_EVERY
            }
        };
        if history_due {
            self.persist_history(name, now);
        }
        let Some(f) = self.fleets.get_mut(name) else {
            return;
        };
        let due = match &f.policy_saved {
            None => true,
            Some((at, saved)) => {
                *saved != memory
                    && (saved.last_scale_in != memory.last_scale_in
                        || saved.last_scale_out != memory.last_scale_out
                        || now.saturating_duration_since(*at) >= POLICY_SAVE_EVERY)
            }
        };
        if due {
            self.persist_fleet(name);
            if let Some(f) = self.fleets.get_mut(name) {
                f.policy_saved = Some((now, memory));
            }
        }
    }

    fn store_write(&self, write: impl FnOnce(&dyn Store) -> Result<(), StoreError>) {
        if let Err(e) = write(self.store.as_ref()) {
            tracing::error!(error = %error_chain(&e), "failed to write to the store");
        }
    }

    /// Claims the one decrement `instance` may have, in the store, before
    /// the terminate call. `leaving` says whether the group shows the
    /// instance terminating (or no longer lists it) this pass.
    ///
    /// An earlier claim that was never confirmed means a controller stopped
    /// between its intent and the answer: the call may or may not have gone
    /// out. The group's view decides, once it can be trusted: an instance
    /// it shows leaving took that decrement ([`DecrementClaim::Done`]); one
    /// it still runs [`CLAIM_SETTLE`] after the claim never got the call,
    /// so the claim is taken again. Until then the caller waits. Each
    /// instance is decremented at most once, and a crash in between costs a
    /// wait, not a decrement.
    pub fn claim_decrement(
        &mut self,
        minion: &str,
        instance: &InstanceId,
        leaving: bool,
        now: Instant,
    ) -> Result<DecrementClaim, StoreError> {
        let fleet = self
            .minions
            .get(minion)
            .map(|m| m.fleet.clone())
            .unwrap_or_default();
        let at = self.wall_ms(now);
        if self
            .store
            .claim_decrement(&instance.0, minion, &fleet, at)?
        {
            self.ledger.insert(instance.0.clone(), (now, false));
            return Ok(DecrementClaim::Claimed);
        }
        // Not in memory: claimed by a controller before the store had a
        // ledger for this fleet; treat it as done.
        let Some((asked, confirmed)) = self.ledger.get(&instance.0).copied() else {
            return Ok(DecrementClaim::Done);
        };
        if confirmed {
            return Ok(DecrementClaim::Done);
        }
        if leaving {
            self.store.confirm_decrement(&instance.0, at)?;
            self.ledger.insert(instance.0.clone(), (asked, true));
            self.emit_decrement_seen(&fleet, minion, instance);
            return Ok(DecrementClaim::Done);
        }
        if now.saturating_duration_since(asked) < CLAIM_SETTLE {
            return Ok(DecrementClaim::Wait);
        }
        self.store.release_decrement(&instance.0)?;
        if self
            .store
            .claim_decrement(&instance.0, minion, &fleet, at)?
        {
            self.ledger.insert(instance.0.clone(), (now, false));
            return Ok(DecrementClaim::Claimed);
        }
        Ok(DecrementClaim::Done)
    }

    /// An unconfirmed claim for `minion`'s instance, settled by the group no
    /// longer listing it: the earlier call took effect. Confirmed in the
    /// store and said in the event log, so a terminate whose answer a
    /// restart lost is still on record with its decrement.
    fn confirm_gone(&mut self, fleet: &str, minion: &str, now: Instant) {
        let Some(instance) = self.minions.get(minion).map(|m| m.instance.clone()) else {
            return;
        };
        let Some(entry) = self.ledger.get_mut(&instance.0).filter(|e| !e.1) else {
            return;
        };
        entry.1 = true;
        self.store_write(|s| s.confirm_decrement(&instance.0, self.wall_ms(now)));
        self.emit_decrement_seen(fleet, minion, &instance);
    }

    fn emit_decrement_seen(&mut self, fleet: &str, minion: &str, instance: &InstanceId) {
        self.emit(
            fleet,
            Some(minion),
            EventKind::Step,
            format!(
                "the group shows {instance} leaving: an earlier terminate call whose answer was not recorded took effect, desired capacity decremented"
            ),
        );
    }

    /// The outcome of a decrementing terminate: confirmed, or certainly not
    /// applied (the claim is dropped, so a later call may decrement).
    pub fn settle_decrement(&mut self, instance: &InstanceId, applied: bool, now: Instant) {
        if applied {
            self.store_write(|s| s.confirm_decrement(&instance.0, self.wall_ms(now)));
            if let Some(entry) = self.ledger.get_mut(&instance.0) {
                entry.1 = true;
            }
        } else {
            self.store_write(|s| s.release_decrement(&instance.0));
            self.ledger.remove(&instance.0);
        }
    }

    /// True when the group shows `instance` terminating or no longer lists
    /// it (as of this pass's sync).
    pub fn instance_leaving(&self, fleet: &str, instance: &InstanceId) -> bool {
        self.fleets
            .get(fleet)
            .and_then(|f| f.group.as_ref())
            .is_some_and(|g| {
                g.instances
                    .iter()
                    .find(|i| &i.id == instance)
                    .is_none_or(|i| i.lifecycle == InstanceLifecycle::Terminating)
            })
    }

    pub fn emit(&mut self, fleet: &str, minion: Option<&str>, kind: EventKind, message: String) {
        self.push_event(Event {
            at: SystemTime::now(),
            fleet: fleet.to_owned(),
            minion: minion.map(str::to_owned),
            kind,
            message,
            transition: None,
            actor: None,
        });
    }

    /// Like [`Registry::emit`], for an admin action: names who made it.
    pub fn emit_admin(&mut self, fleet: &str, minion: Option<&str>, actor: &str, message: String) {
        self.push_event(Event {
            at: SystemTime::now(),
            fleet: fleet.to_owned(),
            minion: minion.map(str::to_owned),
            kind: EventKind::Admin,
            message: format!("{message} (by {actor})"),
            transition: None,
            actor: Some(actor.to_owned()),
        });
    }

    fn push_event(&mut self, event: Event) {
        let row = event_row(&event);
        self.store_write(|s| s.append_events(std::slice::from_ref(&row)).map(drop));
        self.announce(event);
    }

    /// Logs an event already in the store and sends it to watchers.
    fn announce(&self, event: Event) {
        match event.kind {
            EventKind::Warning => {
                tracing::warn!(fleet = %event.fleet, minion = event.minion.as_deref().unwrap_or("-"), "{}", event.message)
            }
            _ => tracing::info!(
                fleet = %event.fleet,
                minion = event.minion.as_deref().unwrap_or("-"),
                kind = event.kind.as_str(),
                "{}",
                event.message
            ),
        }
        // No subscriber is fine.
        let _ = self.events.send(event);
    }

    /// Every minion, by id.
    pub fn minions(&self) -> impl Iterator<Item = &MinionRecord> {
        self.minions.values()
    }

    /// Minion `id`, for the bookkeeping of the calls made for it; its state
    /// changes only through [`Registry::transition`].
    pub fn minion_mut(&mut self, id: &str) -> Option<&mut MinionRecord> {
        self.minions.get_mut(id)
    }

    /// Fleet `name`'s state.
    pub fn fleet_state(&self, name: &str) -> Option<&FleetState> {
        self.fleets.get(name)
    }

    /// Fleet `name`'s state, to change its overrides or the cloud's view;
    /// [`Registry::persist_fleet`] writes the overrides.
    pub fn fleet_state_mut(&mut self, name: &str) -> Option<&mut FleetState> {
        self.fleets.get_mut(name)
    }

    pub fn minion_by_instance(&self, instance: &InstanceId) -> Option<&MinionRecord> {
        self.by_instance
            .get(instance)
            .and_then(|id| self.minions.get(id))
    }

    /// Finds a minion by its id or its instance id.
    pub fn find(&self, id_or_instance: &str) -> Option<&MinionRecord> {
        self.minions
            .get(id_or_instance)
            .or_else(|| self.minion_by_instance(&InstanceId(id_or_instance.to_owned())))
    }

    fn ensure_minion(&mut self, fleet: &str, instance: &InstanceId, now: Instant) -> String {
        if let Some(id) = self.by_instance.get(instance) {
            return id.clone();
        }
        let id = loop {
            let candidate = format!("m-{:06x}", rand::rng().random_range(0..0x100_0000u32));
            if !self.minions.contains_key(&candidate) {
                break candidate;
            }
        };
        self.minions.insert(
            id.clone(),
            MinionRecord {
                id: id.clone(),
                fleet: fleet.to_owned(),
                instance: instance.clone(),
                state: MinionState::Pending,
                state_since: now,
                created: now,
                engine_address: None,
                metrics_address: None,
                session_token: None,
                session: None,
                last_report: None,
                last_seen: None,
                last_report_at: None,
                rate_per_s: None,
                drain: None,
                registered: false,
                history: Vec::new(),
                lb_connections_at_deregistration: None,
                lb_connections_at_drain_start: None,
                deregistered_at: None,
                hook_heartbeat_at: None,
                launch_completed: false,
                termination_completed: false,
                last_busy_at: None,
                verify_registration: false,
                shed_at: None,
            },
        );
        self.by_instance.insert(instance.clone(), id.clone());
        self.emit(
            fleet,
            Some(&id),
            EventKind::Step,
            format!("instance {instance} discovered"),
        );
        self.persist(&id);
        id
    }

    /// Applies a lifecycle event; records and announces a change of state.
    pub fn transition(
        &mut self,
        id: &str,
        event: LifecycleEvent,
        reason: &str,
        now: Instant,
    ) -> Result<MinionState, RegistryError> {
        let m = self
            .minions
            .get_mut(id)
            .ok_or_else(|| RegistryError::UnknownMinion(id.to_owned()))?;
        let from = m.state;
        let to = step(from, event)?;
        if to == from {
            return Ok(to);
        }
        let at = SystemTime::now();
        if let Some(metrics) = self.fleets.get(&m.fleet).map(|f| &f.metrics) {
            observe_transition(metrics, m, to, now, at);
        }
        m.state = to;
        m.state_since = now;
        m.history.push(HistoryEntry {
            from,
            to,
            at,
            reason: reason.to_owned(),
        });
        if to == MinionState::Gone {
            m.session = None;
        }
        let fleet = m.fleet.clone();
        let event = Event {
            at,
            fleet,
            minion: Some(id.to_owned()),
            kind: EventKind::Transition,
            message: format!("{from} → {to}: {reason}"),
            transition: Some((from, to)),
            actor: None,
        };
        // The new state and the event that records it, in one transaction:
        // a controller killed in between finds both or neither.
        if let Some(row) = self.minion_row(id) {
            let events = [event_row(&event)];
            self.store_write(|s| s.put_minion_with_events(&row, &events));
        }
        self.announce(event);
        Ok(to)
    }

    /// A minion's agent joined (or joined again). Returns its id and a fresh
    /// session token.
    pub fn join(
        &mut self,
        fleet: &str,
        instance: &InstanceId,
        engine_address: SocketAddr,
        now: Instant,
    ) -> Result<(String, String), RegistryError> {
        if !self.fleets.contains_key(fleet) {
            return Err(RegistryError::UnknownFleet(fleet.to_owned()));
        }
        let id = self.ensure_minion(fleet, instance, now);
        self.transition(&id, LifecycleEvent::Joined, "agent joined", now)?;
        let token: String = {
            let mut rng = rand::rng();
            (0..32)
                .map(|_| format!("{:02x}", rng.random::<u8>()))
                .collect()
        };
        let m = self
            .minions
            .get_mut(&id)
            .ok_or_else(|| RegistryError::UnknownMinion(id.clone()))?;
        if m.engine_address != Some(engine_address) && m.registered {
            tracing::warn!(minion = %id, "engine address changed while registered");
        }
        let moved = m.engine_address != Some(engine_address);
        m.engine_address = Some(engine_address);
        m.session_token = Some(token.clone());
        m.last_seen = Some(now);
        if moved {
            self.persist(&id);
        }
        Ok((id, token))
    }

    /// Binds a new Session to a minion. Returns its generation and the
    /// command to resend if a drain was already under way.
    pub fn attach_session(
        &mut self,
        id: &str,
        token: &str,
        tx: CommandSender,
        drain_deadline: Duration,
        now: Instant,
    ) -> Result<(u64, Option<Command>), SessionRefusal> {
        let generation = self.next_generation;
        self.next_generation += 1;
        let m = self
            .minions
            .get_mut(id)
            .ok_or(SessionRefusal::UnknownMinion)?;
        if m.session_token.as_deref() != Some(token) {
            return Err(SessionRefusal::BadToken);
        }
        if matches!(
            m.state,
            MinionState::Gone | MinionState::Terminating | MinionState::Lost
        ) {
            return Err(SessionRefusal::Retired(m.state));
        }
        m.session = Some(SessionLink {
            generation,
            tx,
            last_seq: 0,
        });
        m.last_seen = Some(now);
        let resend = match (m.state, &m.drain) {
            (MinionState::Draining(DrainPhase::Flushing), Some(plan)) => Some(Command::Drain {
                deadline: drain_deadline,
                reason: plan.reason.clone(),
            }),
            _ => None,
        };
        Ok((generation, resend))
    }

    pub fn detach_session(&mut self, id: &str, generation: u64) {
        if let Some(m) = self.minions.get_mut(id)
            && m.session
                .as_ref()
                .is_some_and(|s| s.generation == generation)
        {
            m.session = None;
        }
    }

    /// Asks an in-service minion over its Session to close `count` of its
    /// connections (rebalancing), and records the ask. False when it is no
    /// longer in service or its Session is gone or full (the next pass
    /// decides again).
    pub fn ask_to_shed(
        &mut self,
        fleet: &str,
        id: &str,
        count: u64,
        reason: &str,
        now: Instant,
    ) -> bool {
        let Some(m) = self.minions.get_mut(id) else {
            return false;
        };
        if m.state != MinionState::InService {
            return false;
        }
        let Some(link) = &m.session else {
            return false;
        };
        let cmd = Command::Shed {
            count,
            reason: reason.to_owned(),
        };
        if link.tx.try_send(Ok(cmd)).is_err() {
            return false;
        }
        m.shed_at = Some(now);
        self.emit(
            fleet,
            Some(id),
            EventKind::Step,
            format!("asked to shed {count} connections: {reason}"),
        );
        true
    }

    /// Takes a report from a Session. Returns true when it changed a state
    /// (the fleet's reconcile loop should run soon).
    pub fn report(&mut self, id: &str, generation: u64, r: Report, now: Instant) -> bool {
        let Some(m) = self.minions.get_mut(id) else {
            return false;
        };
        let Some(link) = m.session.as_mut().filter(|s| s.generation == generation) else {
            return false;
        };
        if r.seq <= link.last_seq {
            tracing::warn!(minion = %id, seq = r.seq, last = link.last_seq, "out-of-order report ignored");
            return false;
        }
        link.last_seq = r.seq;
        if let Some(f) = self.fleets.get(&m.fleet) {
            count_report(&f.metrics, m.last_report.as_ref(), &r);
        }
        if let (Some(prev), Some(at)) = (m.last_report, m.last_report_at) {
            let secs = now.saturating_duration_since(at).as_secs_f64();
            if secs > 0.0 && r.processed_total >= prev.processed_total {
                m.rate_per_s = Some((r.processed_total - prev.processed_total) as f64 / secs);
            }
        }
        m.last_report = Some(r);
        if r.queue_depth > 0 || r.in_flight > 0 {
            m.last_busy_at = Some(now);
        }
        m.last_report_at = Some(now);
        m.last_seen = Some(now);
        let state = m.state;
        let no_drain_on_record = m.drain.is_none();
        if r.draining && no_drain_on_record && !state.is_leaving() && state != MinionState::Pending
        {
            // A controller that lost its memory, or an operator's own stop:
            // adopt it as a drain, never register it again.
            let reason = "the engine reports draining with no drain on record: adopted, not registered again";
            if self
                .transition(id, LifecycleEvent::DrainReported, reason, now)
                .is_ok()
            {
                self.set_drain(id, false, reason);
                return true;
            }
            return false;
        }
        let event = match state {
            MinionState::Joining | MinionState::Unhealthy if r.healthy => {
                (LifecycleEvent::EngineHealthy, "engine healthy")
            }
            MinionState::Ready | MinionState::InService if !r.healthy && !r.draining => {
                (LifecycleEvent::EngineUnhealthy, "engine reports unhealthy")
            }
            MinionState::Draining(DrainPhase::Flushing) if r.drained => (
                LifecycleEvent::Drained,
                "queue empty, nothing in flight, no connections",
            ),
            _ => return false,
        };
        self.transition(id, event.0, event.1, now).is_ok()
    }

    /// Marks a minion for removal.
    pub fn choose_for_drain(
        &mut self,
        id: &str,
        decrement: bool,
        reason: &str,
        now: Instant,
    ) -> Result<(), RegistryError> {
        self.transition(id, LifecycleEvent::DrainChosen, reason, now)?;
        self.set_drain(id, decrement, reason);
        Ok(())
    }

    /// Puts a drain on record for a minion that has none (a second choice
    /// keeps the first's decrement and reason).
    fn set_drain(&mut self, id: &str, decrement: bool, reason: &str) {
        if let Some(m) = self.minions.get_mut(id)
            && m.drain.is_none()
        {
            m.drain = Some(DrainPlan {
                decrement,
                reason: reason.to_owned(),
                overdue_reported: false,
            });
            self.persist(id);
        }
    }

    /// Takes the group's view for `fleet`: an instance not seen before gets a
    /// Pending minion. What happens to known ones is [`Registry::plan`]'s.
    pub fn sync(&mut self, fleet: &str, group: GroupState, now: Instant) {
        let hooked = self
            .fleets
            .get(fleet)
            .and_then(|f| f.aws.as_ref())
            .map(|view| view.terminating_wait.clone())
            .unwrap_or_default();
        for i in &group.instances {
            // An instance held by the terminating hook needs its action
            // completed even if its minion never joined (or the controller
            // restarted): it gets a record too.
            if !self.by_instance.contains_key(&i.id)
                && (i.lifecycle != InstanceLifecycle::Terminating || hooked.contains(&i.id))
            {
                self.ensure_minion(fleet, &i.id, now);
            }
        }
        if let Some(f) = self.fleets.get_mut(fleet) {
            f.group = Some(group);
        }
    }

    /// The fleet's minions as the planner sees them at `now`.
    pub fn snapshots(&self, fleet: &str, now: Instant) -> Vec<MinionSnapshot<'_>> {
        snapshots_of(&self.minions, fleet, now)
    }

    /// What the cloud showed `fleet` at its last sync.
    fn cloud_view(&self, fleet: &str) -> CloudView<'_> {
        let Some(f) = self.fleets.get(fleet) else {
            return CloudView::default();
        };
        fn set(ids: &HashSet<InstanceId>) -> std::collections::BTreeSet<Cow<'_, str>> {
            ids.iter().map(|i| Cow::from(i.0.as_str())).collect()
        }
        CloudView {
            instances: f
                .group
                .iter()
                .flat_map(|g| &g.instances)
                .map(|i| {
                    let listed = match i.lifecycle {
                        InstanceLifecycle::Pending => Listed::Pending,
                        InstanceLifecycle::InService => Listed::InService,
                        InstanceLifecycle::Terminating => Listed::Terminating,
                    };
                    (Cow::from(i.id.0.as_str()), listed)
                })
                .collect(),
            hooks: f.aws.as_ref().map(|v| HookView {
                pending_wait: set(&v.pending_wait),
                terminating_wait: set(&v.terminating_wait),
                in_service: set(&v.in_service),
                protected: set(&v.protected),
            }),
        }
    }
    /// One pass's plan for `fleet` at `now` ([`gru_core::plan::plan`]): its
    /// changes are applied here, through the step function; its cloud calls
    /// are returned for the shell to make.
    pub fn plan(&mut self, fleet: &str, limits: &Limits, now: Instant) -> Vec<Action> {
        let plan = {
            let snapshots = self.snapshots(fleet, now);
            let cloud = self.cloud_view(fleet);
            gru_core::plan::plan(&snapshots, &cloud, limits)
        };
        for change in plan.changes {
            self.apply(fleet, change, limits, now);
        }
        self.forget_long_gone(fleet, now);
        plan.actions
    }

    fn apply(&mut self, fleet: &str, change: Change, limits: &Limits, now: Instant) {
        match change {
            Change::Gone { id } => {
                self.confirm_gone(fleet, &id, now);
                let _ = self.transition(
                    &id,
                    LifecycleEvent::InstanceGone,
                    "instance no longer in the group",
                    now,
                );
            }
            Change::Lost { id, silent_for } => {
                let reason = format!(
                    "no report for {}",
                    humantime::format_duration(round(silent_for))
                );
                let _ = self.transition(&id, LifecycleEvent::ReportsMissed, &reason, now);
                self.emit(
                    fleet,
                    Some(&id),
                    EventKind::Warning,
                    format!("minion lost: {reason}"),
                );
            }
            Change::Drain {
                id,
                decrement,
                reason,
            } => {
                let _ = self.choose_for_drain(&id, decrement, &reason, now);
            }
            Change::NoDecrement { id } => {
                let Some(m) = self.minions.get_mut(&id) else {
                    return;
                };
                if let Some(d) = m.drain.as_mut() {
                    d.decrement = false;
                }
                // Chosen for scale-in, but the group got there first: its
                // termination is the only one, and it decrements or not by
                // itself.
                let message = format!(
                    "the group is terminating {} itself (terminating lifecycle hook): no decrement from the controller",
                    m.instance
                );
                self.persist(&id);
                self.emit(fleet, Some(&id), EventKind::Step, message);
            }
            Change::Overdue { id } => {
                if let Some(d) = self.minions.get_mut(&id).and_then(|m| m.drain.as_mut()) {
                    d.overdue_reported = true;
                }
                self.persist(&id);
                self.emit(
                    fleet,
                    Some(&id),
                    EventKind::Warning,
                    format!(
                        "drain overdue: still working after {}; it will not be terminated while it holds work",
                        humantime::format_duration(limits.drain_deadline)
                    ),
                );
            }
            Change::RetryTerminate { id } => {
                if let Some(m) = self.minions.get_mut(&id) {
                    m.state_since = now;
                }
                self.persist(&id);
                self.emit(
                    fleet,
                    Some(&id),
                    EventKind::Warning,
                    "still running after its terminate: asking again".to_owned(),
                );
            }
        }
    }

    /// The fleet as the metrics show it now: one pass over its minions.
    pub fn picture(&self, fleet: &str, now: Instant) -> FleetPicture {
        let _ = now;
        let mut p = FleetPicture::default();
        let Some(f) = self.fleets.get(fleet) else {
            return p;
        };
        let window = f
            .last_decision
            .as_ref()
            .and_then(|d| d.explanation.window.as_ref());
        let bounds = gru_core::policy::effective_bounds(f.config.bounds(), window);
        p.active_min = bounds.min;
        p.active_max = bounds.max;
        p.desired = f.last_decision.as_ref().map(|d| d.desired);
        if let Some(d) = &f.last_decision {
            p.arrivals_per_s = d.explanation.arrivals_per_s;
            p.service_rate = d.explanation.service_rate;
            p.forecast = d.explanation.forecast;
        }
        p.group_desired = f.group.as_ref().map(|g| g.desired);
        p.paused = f.paused.is_some();
        p.pinned = f.pin.is_some();
        for m in self.minions.values().filter(|m| m.fleet == fleet) {
            p.count(m.state);
            if m.state.counts_as_capacity() {
                p.capacity += 1;
                let load = m.load();
                p.queued += load.queue_depth;
                p.in_flight += load.in_flight;
            }
            if m.session.is_some() {
                p.sessions += 1;
            }
            if m.state.is_draining() && m.drain.as_ref().is_some_and(|d| d.overdue_reported) {
                p.drains_overdue += 1;
            }
        }
        p
    }

    /// Prometheus HTTP service discovery: one target group per minion of
    /// `fleet` that advertised a metrics address and is not gone.
    pub fn metrics_targets(&self, fleet: &str) -> Vec<serde_json::Value> {
        self.minions
            .values()
            .filter(|m| m.fleet == fleet && m.state != MinionState::Gone)
            .filter_map(|m| {
                let addr = m.metrics_address?;
                Some(serde_json::json!({
                    "targets": [addr.to_string()],
                    "labels": {
                        "fleet": m.fleet,
                        "minion": m.id,
                        "instance_id": m.instance.0,
                    },
                }))
            })
            .collect()
    }

    /// Forgets minions Gone for longer than [`GONE_RETENTION`] (their
    /// events stay in the log).
    fn forget_long_gone(&mut self, fleet: &str, now: Instant) {
        let stale: Vec<String> = self
            .minions
            .values()
            .filter(|m| {
                m.fleet == fleet
                    && m.state == MinionState::Gone
                    && now.saturating_duration_since(m.state_since) > GONE_RETENTION
            })
            .map(|m| m.id.clone())
            .collect();
        for id in stale {
            if let Some(m) = self.minions.remove(&id) {
                self.by_instance.remove(&m.instance);
                self.store_write(|s| s.delete_minion(&id));
            }
        }
    }

    /// The engine address and instance of a minion, as a load balancer
    /// target.
    pub fn target(&self, id: &str) -> Option<Target> {
        self.minions.get(id).and_then(|m| m.target())
    }

    /// The instance of a minion.
    pub fn instance(&self, id: &str) -> Option<InstanceId> {
        self.minions.get(id).map(|m| m.instance.clone())
    }

    /// True while some minion of the fleet is between Draining and Gone, so
    /// the loop should come back sooner than the evaluation interval.
    pub fn busy(&self, fleet: &str) -> bool {
        self.minions.values().any(|m| {
            m.fleet == fleet
                && matches!(
                    m.state,
                    MinionState::Ready
                        | MinionState::Unhealthy
                        | MinionState::Draining(_)
                        | MinionState::Drained
                        | MinionState::Terminating
                        | MinionState::Lost
                )
        })
    }

    /// Runs the policy for `fleet` at `now` (`wall` is the same moment on
    /// the wall clock, for schedules) with the signals read from outside the
    /// fleet (`external`): records the decision, chooses victims for
    /// scale-in, and returns the group's desired capacity to set, if it must
    /// grow.
    pub fn decide(
        &mut self,
        fleet: &str,
        now: Instant,
        wall: Timestamp,
        external: Vec<ExternalSignal>,
    ) -> Option<u32> {
        // Borrows the minions only, so the fleet's state can change below.
        let snapshots = snapshots_of(&self.minions, fleet, now);
        let capacity = gru_core::plan::capacity(&snapshots);
        let loads: Vec<MinionLoad> = self
            .minions
            .values()
            .filter(|m| m.fleet == fleet)
            .filter(|m| matches!(m.state, MinionState::Ready | MinionState::InService))
            .map(|m| {
                let load = m.load();
                MinionLoad {
                    queued: load.queue_depth,
                    in_flight: load.in_flight,
                    rate_per_s: m.rate_per_s,
                }
            })
            .collect();
        let f = self.fleets.get_mut(fleet)?;
        let pinned_before = f
            .last_decision
            .as_ref()
            .is_some_and(|d| matches!(d.explanation.pin, PinStatus::Active(_)));
        let pinned_now = f
            .pin
            .as_ref()
            .is_some_and(|p| p.pin.until.is_none_or(|until| until > wall));
        if f.last_decision.is_none() || (pinned_before && !pinned_now) {
            // A controller that just started has no history, and during a
            // pin the policy's history followed the load, not the pin: count
            // the capacity there is as recommended now, so the fleet does not
            // scale in before a whole stabilization window has passed (after
            // a start, or after a pin is released or expires).
            f.policy_state.record_recommendation(wall, capacity);
        }
        let obs = Observation {
            capacity,
            minions: loads,
            external,
        };
        let overrides = Overrides {
            paused: f.paused.is_some(),
            pin: f.pin.as_ref().map(|p| p.pin),
        };
        let decision = policy::evaluate(
            &f.config.policy,
            &mut f.policy_state,
            &obs,
            &overrides,
            wall,
        );
        let before = f
            .last_decision
            .as_ref()
            .map_or(decision.explanation.capacity, |d| d.desired);
        let changed = f
            .last_decision
            .as_ref()
            .is_none_or(|d| d.desired != decision.desired);
        if decision.applied && decision.desired != before {
            let direction = if decision.desired > before {
                "up"
            } else {
                "down"
            };
            f.metrics
                .decision(&decision.explanation.source_name(), direction);
        }
        let desired = decision.desired;
        let applied = decision.applied;
        let group = f.group.as_ref().map(|g| GroupSize {
            desired: g.desired,
            max: g.max,
        });
        let line = summary(&decision.explanation);
        f.last_decision = Some(decision);
        let scaling = applied.then(|| gru_core::plan::scale(&snapshots, desired, group));
        drop(snapshots);
        if changed {
            self.emit(fleet, None, EventKind::Decision, line);
        }
        self.maybe_persist_policy(fleet, now);
        let scaling = scaling?;
        for id in scaling.victims {
            let reason = format!("scale-in to {desired}");
            if let Err(e) = self.choose_for_drain(&id, true, &reason, now) {
                tracing::warn!(minion = %id, error = %e, "could not choose for drain");
            }
        }
        if let (Some(want), Some(g)) = (scaling.clipped_by_group_max, group) {
            self.emit(
                fleet,
                None,
                EventKind::Warning,
                format!("the group's own max {} clips desired {want}", g.max),
            );
        }
        scaling.grow_to
    }
}

/// The minions of `fleet` as the planner sees them at `now`, borrowing their
/// ids from the records (a pass copies no string).
fn snapshots_of<'a>(
    minions: &'a BTreeMap<String, MinionRecord>,
    fleet: &str,
    now: Instant,
) -> Vec<MinionSnapshot<'a>> {
    let age = |t: Instant| now.saturating_duration_since(t);
    minions
        .values()
        .filter(|m| m.fleet == fleet)
        .map(|m| MinionSnapshot {
            id: Cow::from(m.id.as_str()),
            instance: Cow::from(m.instance.0.as_str()),
            state: m.state,
            in_state_for: age(m.state_since),
            silent_for: age(m.last_seen.unwrap_or(m.created)),
            joined: m.engine_address.is_some(),
            registered: m.registered,
            verify_registration: m.verify_registration,
            drain: m.drain.as_ref().map(|d| DrainIntent {
                decrement: d.decrement,
                overdue_reported: d.overdue_reported,
            }),
            load: m.load(),
            since_busy: m.last_busy_at.map(age),
            since_heartbeat: m.hook_heartbeat_at.map(age),
            launch_completed: m.launch_completed,
            termination_completed: m.termination_completed,
            connections: m.last_report.map_or(0, |r| r.open_connections),
            can_shed: m.last_report.is_some_and(|r| r.can_shed),
            since_shed: m.shed_at.map(age),
        })
        .collect()
}

/// Counts what a report adds to the fleet's totals since the minion's
/// previous one. A total that went down (the engine restarted) counts from
/// zero; a minion's first report sets its baseline and counts nothing.
fn count_report(metrics: &FleetMetrics, prev: Option<&Report>, r: &Report) {
    metrics.reports.inc();
    let Some(prev) = prev else {
        return;
    };
    let delta = |now: u64, before: u64| now.checked_sub(before).unwrap_or(now);
    metrics
        .processed
        .inc_by(delta(r.processed_total, prev.processed_total));
    metrics
        .failed
        .inc_by(delta(r.failed_total, prev.failed_total));
    // Every accepted message is queued, in flight, processed or failed.
    let received = |r: &Report| r.processed_total + r.failed_total + r.queue_depth + r.in_flight;
    metrics
        .received
        .inc_by(received(r).saturating_sub(received(prev)));
}

/// Counts and times what a change of state ends: a drain, a
/// deregistration, a minion lost.
fn observe_transition(
    metrics: &FleetMetrics,
    m: &MinionRecord,
    to: MinionState,
    now: Instant,
    at: SystemTime,
) {
    let from = m.state;
    if from == MinionState::Draining(DrainPhase::Deregistering) && to != from {
        metrics
            .deregistration
            .observe(now.saturating_duration_since(m.state_since).as_secs_f64());
    }
    if to == MinionState::Drained && from.is_draining() {
        let started = m
            .history
            .iter()
            .rev()
            .find(|h| h.to.is_draining() && !h.from.is_draining())
            .map(|h| h.at);
        if let Some(d) = started.and_then(|s| at.duration_since(s).ok()) {
            metrics.drain.observe(d.as_secs_f64());
        }
    }
    if to == MinionState::Lost {
        metrics.lost.inc();
    }
}

/// One line for a decision: what it wants, what decided it, what clipped it.
pub fn summary(e: &Explanation) -> String {
    let why = match &e.source {
        Source::Rule(i) => e
            .recommendations
            .get(*i)
            .map_or_else(String::new, |r| r.detail.clone()),
        Source::NoRecommendation => "no rule recommended a size; holding".to_owned(),
        Source::Schedule(name) => format!("window {name} sets the size"),
        Source::Pin => "pinned by an operator".to_owned(),
    };
    let mut line = format!("desired {} (from {}): {why}", e.desired, e.capacity);
    let clips: Vec<&str> = e.clips.iter().map(|c| c.kind.as_str()).collect();
    if !clips.is_empty() {
        line.push_str(&format!("; clipped by {}", clips.join(", ")));
    }
    if let Some(w) = &e.window {
        line.push_str(&format!("; window {}", w.name));
    }
    if !e.applied {
        line.push_str(" (paused: not applied)");
    }
    line
}

/// Why a Session was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum SessionRefusal {
    UnknownMinion,
    BadToken,
    Retired(MinionState),
}

fn round(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

pub(crate) fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn event_row(event: &Event) -> EventRow {
    EventRow {
        seq: 0,
        at_ms: unix_ms(event.at),
        fleet: event.fleet.clone(),
        minion: event.minion.clone(),
        kind: event.kind.as_str().to_owned(),
        message: event.message.clone(),
        from: event.transition.map(|(f, _)| f.as_str().to_owned()),
        to: event.transition.map(|(_, t)| t.as_str().to_owned()),
        actor: event.actor.clone(),
    }
}

pub(crate) fn event_from_row(row: EventRow) -> Event {
    let transition = match (row.from.as_deref(), row.to.as_deref()) {
        (Some(f), Some(t)) => MinionState::parse(f).zip(MinionState::parse(t)),
        _ => None,
    };
    Event {
        at: UNIX_EPOCH + Duration::from_millis(row.at_ms.max(0) as u64),
        fleet: row.fleet,
        minion: row.minion,
        kind: EventKind::parse(&row.kind),
        message: row.message,
        transition,
        actor: row.actor,
    }
}

/// The policy memory as the store keeps it: one line of JSON with
/// timestamps in unix milliseconds. The demand history is not in it: it is
/// written apart ([`encode_history`]).
fn encode_policy_memory(m: &PolicyMemory) -> String {
    let ms = |t: Option<Timestamp>| t.map(|t| t.as_millisecond());
    serde_json::json!({
        "recent": m.recent.iter().map(|(t, v)| (t.as_millisecond(), v)).collect::<Vec<_>>(),
        "last_scale_out": ms(m.last_scale_out),
        "last_scale_in": ms(m.last_scale_in),
        "needs": m.needs.iter().map(|(t, v)| (t.as_millisecond(), v)).collect::<Vec<_>>(),
    })
    .to_string()
}

fn millis(v: &serde_json::Value) -> Option<Timestamp> {
    v.as_i64()
        .and_then(|ms| Timestamp::from_millisecond(ms).ok())
}

/// The inverse of [`encode_policy_memory`]; `None` for an empty or
/// unreadable memory (the policy then starts afresh, which is safe: a fresh
/// controller holds its size for a stabilization window).
fn decode_policy_memory(s: &str) -> Option<PolicyMemory> {
    if s.is_empty() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(s).ok()?;
    let pairs = |key: &str| -> Vec<(Timestamp, u32)> {
        v.get(key)
            .and_then(|p| p.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|pair| {
                        let at = millis(pair.get(0)?)?;
                        let n = u32::try_from(pair.get(1)?.as_u64()?).ok()?;
                        Some((at, n))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    Some(PolicyMemory {
        recent: pairs("recent"),
        last_scale_out: v.get("last_scale_out").and_then(millis),
        last_scale_in: v.get("last_scale_in").and_then(millis),
        history: HistoryMemory::default(),
        needs: pairs("needs"),
    })
}

/// A fleet's demand history as the store keeps it: the first bucket's start
/// in unix milliseconds and one rate per bucket, to 0.01 msg/s (`null`
/// where nothing was recorded).
fn encode_history(h: &HistoryMemory) -> String {
    serde_json::json!({
        "first": h.first.map(|t| t.as_millisecond()),
        "means": h.means.iter()
            .map(|v| v.map(|v| (v * 100.0).round() / 100.0))
            .collect::<Vec<_>>(),
    })
    .to_string()
}

/// The inverse of [`encode_history`]; `None` for an unreadable one (the
/// forecast then waits for its history again, which is safe).
fn decode_history(s: &str) -> Option<HistoryMemory> {
    let v: serde_json::Value = serde_json::from_str(s).ok()?;
    Some(HistoryMemory {
        first: v.get("first").and_then(millis),
        means: v
            .get("means")?
            .as_array()?
            .iter()
            .map(|x| x.as_f64())
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{LocalProviderConfig, ProviderConfig};
    use gru_cloud::Instance;
    use gru_core::Bounds;
    use gru_core::policy::{Behaviour, Policy, Rule};

    /// The wall clock for `t`: the same offset from a fixed instant.
    fn wall(t0: Instant, t: Instant) -> Timestamp {
        let base: Timestamp = "2026-11-25T12:00:00Z".parse().expect("timestamp");
        base.saturating_add(t.saturating_duration_since(t0))
            .expect("in range")
    }

    const LOST: Duration = Duration::from_secs(10);
    const JOIN: Duration = Duration::from_secs(60);
    const UNHEALTHY: Duration = Duration::from_secs(300);

    fn limits() -> Limits {
        Limits {
            lost_timeout: LOST,
            join_timeout: JOIN,
            unhealthy_timeout: UNHEALTHY,
            drain_deadline: Duration::from_secs(60),
            heartbeat_every: Duration::from_secs(30),
            terminate_retry_after: TERMINATE_RETRY_AFTER,
            protect_after_work: PROTECT_AFTER_WORK,
            rebalance: Some(gru_core::rebalance::DEFAULT_REBALANCE),
        }
    }

    /// One pass's bookkeeping: the group's view, then the plan.
    fn pass(reg: &mut Registry, g: &GroupState, now: Instant) -> Vec<Action> {
        reg.sync("f", g.clone(), now);
        reg.plan("f", &limits(), now)
    }

    fn registry(min: u32, max: u32) -> Registry {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::SqliteStore::open(dir.path()).expect("store");
        // The store's directory lives as long as the test process.
        std::mem::forget(dir);
        Registry::open(
            &[fleet_config(min, max)],
            broadcast::channel(64).0,
            Arc::new(store),
            Loaded::default(),
            Instant::now(),
        )
        .expect("registry")
    }

    fn fleet_config(min: u32, max: u32) -> FleetConfig {
        let behaviour = Behaviour {
            scale_in_stabilization: Duration::from_secs(30),
            scale_in_cooldown: Duration::ZERO,
            max_step_in: 10,
            tolerance: 0.0,
            ..Behaviour::default()
        };
        let policy = Policy::new(
            Bounds::new(min, max).expect("bounds"),
            vec![Rule::QueueDepth {
                target_per_minion: 4,
            }],
            behaviour,
            Vec::new(),
        )
        .expect("policy");
        FleetConfig {
            name: "f".to_owned(),
            policy,
            provider: ProviderConfig::Local(LocalProviderConfig {
                listen: "127.0.0.1:0".parse().expect("addr"),
                minion_config: "m.toml".into(),
                deregistration_delay: Duration::from_secs(300),
                log_dir: None,
            }),
            rebalance: Some(gru_core::rebalance::DEFAULT_REBALANCE),
            sqs: None,
            identity: None,
        }
    }

    fn group(ids: &[&str], desired: u32) -> GroupState {
        GroupState {
            desired,
            min: 0,
            max: 20,
            instances: ids
                .iter()
                .map(|id| Instance {
                    id: InstanceId::from(*id),
                    lifecycle: InstanceLifecycle::InService,
                    launched_at: SystemTime::now(),
                })
                .collect(),
        }
    }

    /// Brings instance `i` to InService with an open session; returns its id.
    fn serve(reg: &mut Registry, i: &str, port: u16, now: Instant) -> String {
        let (id, token) = reg
            .join(
                "f",
                &InstanceId::from(i),
                ([127, 0, 0, 1], port).into(),
                now,
            )
            .expect("join");
        let (tx, _rx) = mpsc::channel(4);
        std::mem::forget(_rx);
        reg.attach_session(&id, &token, tx, Duration::from_secs(60), now)
            .expect("session");
        reg.report(
            &id,
            generation(reg, &id),
            Report {
                seq: 1,
                healthy: true,
                ..Default::default()
            },
            now,
        );
        assert_eq!(reg.minions[&id].state, MinionState::Ready);
        reg.minions.get_mut(&id).expect("minion").registered = true;
        reg.transition(&id, LifecycleEvent::Registered, "test", now)
            .expect("registered");
        id
    }

    fn pin(reg: &mut Registry, desired: u32) {
        reg.fleets.get_mut("f").expect("fleet").pin = Some(PinOverride {
            pin: Pin {
                desired,
                until: None,
            },
            origin: Origin {
                by: "test".to_owned(),
                at_ms: 0,
            },
        });
    }

    fn generation(reg: &Registry, id: &str) -> u64 {
        reg.minions[id]
            .session
            .as_ref()
            .expect("session")
            .generation
    }

    fn load(reg: &mut Registry, id: &str, seq: u64, queue: u64, now: Instant) {
        let g = generation(reg, id);
        reg.report(
            id,
            g,
            Report {
                seq,
                queue_depth: queue,
                healthy: true,
                ..Default::default()
            },
            now,
        );
    }

    #[test]
    fn policy_memory_and_history_round_trip_through_the_store_text() {
        let t = |s: &str| s.parse::<Timestamp>().unwrap();
        let memory = PolicyMemory {
            recent: vec![(t("2026-11-25T10:00:00Z"), 5)],
            last_scale_out: Some(t("2026-11-25T09:59:00Z")),
            last_scale_in: None,
            history: HistoryMemory::default(),
            needs: vec![
                (t("2026-11-25T09:58:00Z"), 3),
                (t("2026-11-25T09:59:00Z"), 6),
            ],
        };
        let text = encode_policy_memory(&memory);
        assert_eq!(decode_policy_memory(&text), Some(memory));
        let history = HistoryMemory {
            first: Some(t("2026-11-24T10:00:00Z")),
            means: vec![Some(120.25), None, Some(0.0)],
        };
        assert_eq!(decode_history(&encode_history(&history)), Some(history));
        assert_eq!(decode_history("not json"), None);
        // What a gru without the forecast wrote still reads, with no history.
        let old = r#"{"recent":[[1764064800000,5]],"last_scale_out":null,"last_scale_in":null}"#;
        let back = decode_policy_memory(old).expect("reads");
        assert_eq!(back.recent.len(), 1);
        assert_eq!(back.history, HistoryMemory::default());
        assert!(back.needs.is_empty());
    }

    /// One policy decision for fleet f at `now`: `n` minions each with
    /// `queued` queued, 2 in flight and `rate` msg/s processed.
    fn decide_on(
        reg: &mut Registry,
        config: &FleetConfig,
        now: Timestamp,
        n: usize,
        queued: u64,
        rate: f64,
    ) {
        let f = reg.fleets.get_mut("f").expect("fleet");
        let obs = Observation {
            capacity: n as u32,
            minions: vec![
                MinionLoad {
                    queued,
                    in_flight: 2,
                    rate_per_s: Some(rate),
                };
                n
            ],
            external: Vec::new(),
        };
        policy::evaluate(
            &config.policy,
            &mut f.policy_state,
            &obs,
            &Overrides::default(),
            now,
        );
    }

    #[test]
    fn the_forecast_history_and_hold_memory_survive_a_restart() {
        let mut reg = registry(0, 5);
        let config = fleet_config(0, 5);
        let start: Timestamp = "2026-11-25T10:00:00Z".parse().unwrap();
        // Twenty minutes of decisions on a fleet serving 150 msg/s.
        for step in 0..120u64 {
            let now = start
                .checked_add(Duration::from_secs(step * 10))
                .expect("time");
            decide_on(&mut reg, &config, now, 2, 1, 75.0);
        }
        let before = reg.fleets["f"].policy_state.memory();
        // 10:00–10:19, the minute being recorded (10:19) not yet counted.
        assert_eq!(before.history.means.len(), 4, "{:?}", before.history);
        assert!(before.history.means.iter().all(|m| *m == Some(150.0)));
        assert_eq!(before.needs.len(), 20);
        reg.persist_fleet("f");
        reg.persist_history("f", Instant::now());
        let loaded = reg.store.load().expect("load");
        // The history is its own row; the fleet's row does not carry it.
        assert_eq!(loaded.histories.len(), 1);
        assert!(!loaded.fleets[0].policy_memory.contains("means"));
        let back = Registry::open(
            &[config],
            broadcast::channel(64).0,
            reg.store.clone(),
            loaded,
            Instant::now(),
        )
        .expect("registry");
        assert_eq!(back.fleets["f"].policy_state.memory(), before);
    }

    #[test]
    fn the_history_is_written_once_per_bucket_at_most() {
        let mut reg = registry(0, 5);
        let config = fleet_config(0, 5);
        let start: Timestamp = "2026-11-25T10:00:00Z".parse().unwrap();
        let t0 = Instant::now();
        let histories = |reg: &Registry| reg.store.load().expect("load").histories;
        let decide = |reg: &mut Registry, minute: u64| {
            for s in 0..6 {
                let now = start
                    .checked_add(Duration::from_secs(minute * 60 + s * 10))
                    .expect("time");
                decide_on(reg, &config, now, 1, 0, 10.0 + minute as f64);
            }
            reg.maybe_persist_policy("f", t0 + Duration::from_secs(minute * 60));
        };
        // Nothing recorded yet in the first minute: nothing written.
        decide(&mut reg, 0);
        assert!(histories(&reg).is_empty());
        // The first finished minute is written at once, the next ones (each
        // a busier minute) only a bucket later.
        decide(&mut reg, 1);
        let first = histories(&reg);
        assert_eq!(first.len(), 1);
        for minute in 2..6 {
            decide(&mut reg, minute);
            assert_eq!(histories(&reg), first, "minute {minute}");
        }
        decide(&mut reg, 6);
        assert_ne!(histories(&reg), first);
    }

    #[test]
    fn scale_in_drains_the_least_loaded_and_never_lowers_desired_directly() {
        let t0 = Instant::now();
        let mut reg = registry(1, 5);
        let g = group(&["a", "b", "c"], 3);
        pass(&mut reg, &g, t0);
        let ids: Vec<String> = ["a", "b", "c"]
            .iter()
            .zip(1..)
            .map(|(i, p)| serve(&mut reg, i, p, t0))
            .collect();
        for (id, q) in ids.iter().zip([10, 1, 5]) {
            load(&mut reg, id, 2, q, t0);
        }
        pin(&mut reg, 1);
        // The group already holds 3 = 1 wanted + 2 to be decremented on termination.
        assert_eq!(reg.decide("f", t0, wall(t0, t0), Vec::new()), None);
        let states: Vec<MinionState> = ids.iter().map(|id| reg.minions[id].state).collect();
        assert_eq!(
            states,
            [
                MinionState::InService,
                MinionState::DRAINING,
                MinionState::DRAINING
            ]
        );
        assert!(
            ids[1..]
                .iter()
                .all(|id| reg.minions[id].drain.as_ref().is_some_and(|d| d.decrement))
        );
        // A second pass chooses nobody else.
        assert_eq!(reg.decide("f", t0, wall(t0, t0), Vec::new()), None);
        assert_eq!(
            reg.minions
                .values()
                .filter(|m| m.state.is_draining())
                .count(),
            2
        );

        // Wanting 3 again while two still drain: the group must hold 3 + 2.
        pin(&mut reg, 3);
        assert_eq!(reg.decide("f", t0, wall(t0, t0), Vec::new()), Some(5));
    }

    #[test]
    fn a_drained_minion_is_terminated_once_with_its_decrement() {
        let t0 = Instant::now();
        let mut reg = registry(0, 5);
        pass(&mut reg, &group(&["a"], 1), t0);
        let id = serve(&mut reg, "a", 1, t0);
        reg.choose_for_drain(&id, true, "test", t0).expect("drain");
        let plan = reg.plan("f", &limits(), t0);
        assert!(
            matches!(
                &plan[..],
                [Action::Deregister {
                    registered: true,
                    ..
                }]
            ),
            "{plan:?}"
        );
        // Drained reports count only once the Drain command went out.
        load(&mut reg, &id, 2, 0, t0);
        let g = generation(&reg, &id);
        let drained = Report {
            seq: 3,
            healthy: true,
            draining: true,
            drained: true,
            ..Default::default()
        };
        assert!(!reg.report(&id, g, drained, t0));
        assert_eq!(reg.minions[&id].state, MinionState::DRAINING);
        reg.transition(&id, LifecycleEvent::DrainSent, "test", t0)
            .expect("flushing");
        assert!(reg.report(&id, g, Report { seq: 4, ..drained }, t0));
        assert_eq!(
            reg.minions[&id].state,
            MinionState::Draining(DrainPhase::AwaitingUnused)
        );
        let plan = reg.plan("f", &limits(), t0);
        assert!(
            matches!(
                &plan[..],
                [Action::AwaitUnused {
                    registered: true,
                    ..
                }]
            ),
            "not terminated before its target is unused: {plan:?}"
        );
        reg.transition(&id, LifecycleEvent::TargetUnused, "test", t0)
            .expect("drained");
        let plan = reg.plan("f", &limits(), t0);
        assert!(
            matches!(
                &plan[..],
                [Action::Finish {
                    decrement: true,
                    ..
                }]
            ),
            "{plan:?}"
        );
        reg.transition(&id, LifecycleEvent::TerminateIssued, "test", t0)
            .expect("terminating");
        assert!(
            reg.plan("f", &limits(), t0).is_empty(),
            "no second terminate"
        );
    }

    #[test]
    fn a_silent_minion_is_lost_and_replaced_without_decrement() {
        let t0 = Instant::now();
        let mut reg = registry(0, 5);
        pass(&mut reg, &group(&["a"], 1), t0);
        let id = serve(&mut reg, "a", 1, t0);
        pass(&mut reg, &group(&["a"], 1), t0 + LOST);
        assert_eq!(reg.minions[&id].state, MinionState::InService, "not yet");
        pass(
            &mut reg,
            &group(&["a"], 1),
            t0 + LOST + Duration::from_secs(1),
        );
        assert_eq!(reg.minions[&id].state, MinionState::Lost);
        let plan = reg.plan("f", &limits(), t0);
        assert!(
            matches!(
                &plan[..],
                [Action::Finish {
                    decrement: false,
                    ..
                }]
            ),
            "{plan:?}"
        );
    }

    #[test]
    fn an_instance_that_never_joins_is_replaced() {
        let t0 = Instant::now();
        let mut reg = registry(0, 5);
        pass(&mut reg, &group(&["a"], 1), t0);
        let id = reg.find("a").expect("discovered").id.clone();
        pass(
            &mut reg,
            &group(&["a"], 1),
            t0 + JOIN + Duration::from_secs(1),
        );
        let m = &reg.minions[&id];
        assert_eq!(m.state, MinionState::DRAINING);
        assert!(
            m.drain.as_ref().is_some_and(|d| !d.decrement),
            "replaced, not scaled in"
        );
        let plan = reg.plan("f", &limits(), t0);
        assert!(
            matches!(
                &plan[..],
                [Action::Deregister {
                    registered: false,
                    ..
                }]
            ),
            "{plan:?}"
        );
    }

    #[test]
    fn a_fresh_controller_waits_a_window_before_scaling_in() {
        let t0 = Instant::now();
        let mut reg = registry(0, 5);
        pass(&mut reg, &group(&["a", "b"], 2), t0);
        serve(&mut reg, "a", 1, t0);
        serve(&mut reg, "b", 2, t0);
        reg.decide("f", t0, wall(t0, t0), Vec::new());
        assert_eq!(
            reg.minions
                .values()
                .filter(|m| m.state.is_draining())
                .count(),
            0
        );
        let t1 = t0 + Duration::from_secs(31);
        reg.decide("f", t1, wall(t0, t1), Vec::new());
        assert_eq!(
            reg.minions
                .values()
                .filter(|m| m.state.is_draining())
                .count(),
            2
        );
    }

    #[test]
    fn a_released_or_expired_pin_holds_the_size_for_a_window_before_scaling_in() {
        let draining = |reg: &Registry| {
            reg.minions
                .values()
                .filter(|m| m.state.is_draining())
                .count()
        };
        for expire in [false, true] {
            let t0 = Instant::now();
            let mut reg = registry(0, 5);
            pass(&mut reg, &group(&["a", "b", "c"], 3), t0);
            for (i, id) in ["a", "b", "c"].iter().enumerate() {
                serve(&mut reg, id, i as u16 + 1, t0);
            }
            pin(&mut reg, 3);
            if expire {
                let until = wall(t0, t0 + Duration::from_secs(60));
                reg.fleets
                    .get_mut("f")
                    .expect("fleet")
                    .pin
                    .as_mut()
                    .expect("pin")
                    .pin
                    .until = Some(until);
            }
            // Pinned, with no load, well past the window: the pin holds 3.
            let t1 = t0 + Duration::from_secs(45);
            reg.decide("f", t0, wall(t0, t0), Vec::new());
            reg.decide("f", t1, wall(t0, t1), Vec::new());
            assert_eq!(draining(&reg), 0, "expire={expire}: pinned");
            // Released (`gru scale f auto`), or the pin's end passed.
            let t2 = t0 + Duration::from_secs(61);
            if !expire {
                reg.fleets.get_mut("f").expect("fleet").pin = None;
            }
            reg.decide("f", t2, wall(t0, t2), Vec::new());
            assert_eq!(draining(&reg), 0, "expire={expire}: held at release");
            let t3 = t2 + Duration::from_secs(29);
            reg.decide("f", t3, wall(t0, t3), Vec::new());
            assert_eq!(draining(&reg), 0, "expire={expire}: held within the window");
            let t4 = t2 + Duration::from_secs(31);
            reg.decide("f", t4, wall(t0, t4), Vec::new());
            assert_eq!(draining(&reg), 3, "expire={expire}: after the window");
        }
    }

    #[test]
    fn vanished_instances_are_gone_and_stale_reports_ignored() {
        let t0 = Instant::now();
        let mut reg = registry(0, 5);
        pass(&mut reg, &group(&["a"], 1), t0);
        let id = serve(&mut reg, "a", 1, t0);
        load(&mut reg, &id, 5, 7, t0);
        load(&mut reg, &id, 4, 99, t0);
        assert_eq!(
            reg.minions[&id].load().queue_depth,
            7,
            "an older report does not overwrite a newer one"
        );
        pass(&mut reg, &group(&[], 0), t0);
        assert_eq!(reg.minions[&id].state, MinionState::Gone);
    }

    fn aws_registry() -> Registry {
        let mut reg = registry(0, 5);
        let f = reg.fleets.get_mut("f").expect("fleet");
        f.config.provider = ProviderConfig::Aws(crate::config::AwsProviderConfig {
            fleet: gru_cloud::aws::AwsFleetConfig::new(
                "g",
                "arn:aws:elasticloadbalancing:eu-west-1:123456789012:targetgroup/t/0123456789abcdef",
            ),
            heartbeat_interval: Duration::from_secs(30),
        });
        f.aws = Some(AwsView::default());
        reg
    }

    fn view(reg: &mut Registry) -> &mut AwsView {
        reg.fleets
            .get_mut("f")
            .and_then(|f| f.aws.as_mut())
            .expect("aws view")
    }

    /// Puts a Draining minion past its drain: Flushing, then Drained.
    fn drained(reg: &mut Registry, id: &str, now: Instant) {
        for event in [
            LifecycleEvent::DrainSent,
            LifecycleEvent::Drained,
            LifecycleEvent::TargetUnused,
        ] {
            reg.transition(id, event, "test", now).expect("drained");
        }
    }

    fn finishes(plan: &[Action]) -> Vec<(Finish, bool)> {
        plan.iter()
            .filter_map(|a| match a {
                Action::Finish {
                    finish, decrement, ..
                } => Some((*finish, *decrement)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_termination_held_by_the_hook_is_drained_heartbeated_and_continued() {
        let t0 = Instant::now();
        let mut reg = aws_registry();
        pass(&mut reg, &group(&["a"], 1), t0);
        let id = serve(&mut reg, "a", 1, t0);
        view(&mut reg)
            .terminating_wait
            .insert(InstanceId::from("a"));
        let mut g = group(&["a"], 1);
        g.instances[0].lifecycle = InstanceLifecycle::Terminating;
        pass(&mut reg, &g, t0);
        let m = &reg.minions[&id];
        assert_eq!(m.state, MinionState::DRAINING);
        assert!(
            m.drain.as_ref().is_some_and(|d| !d.decrement),
            "the group already decided"
        );
        let plan = reg.plan("f", &limits(), t0);
        assert!(
            matches!(
                &plan[..],
                [
                    Action::Heartbeat { .. },
                    Action::Deregister {
                        registered: true,
                        ..
                    }
                ]
            ),
            "{plan:?}"
        );
        // Recorded: the next one is due only after the interval.
        reg.minions.get_mut(&id).expect("minion").hook_heartbeat_at = Some(t0);
        let soon = reg.plan("f", &limits(), t0 + Duration::from_secs(1));
        assert!(
            !soon.iter().any(|a| matches!(a, Action::Heartbeat { .. })),
            "{soon:?}"
        );
        // Still reporting while it drains.
        load(&mut reg, &id, 2, 0, t0 + Duration::from_secs(30));
        let later = reg.plan("f", &limits(), t0 + Duration::from_secs(30));
        assert!(
            later.iter().any(|a| matches!(a, Action::Heartbeat { .. })),
            "{later:?}"
        );

        drained(&mut reg, &id, t0);
        let plan = reg.plan("f", &limits(), t0);
        assert_eq!(finishes(&plan), [(Finish::ContinueTermination, false)]);
        reg.minions
            .get_mut(&id)
            .expect("minion")
            .termination_completed = true;
        reg.transition(&id, LifecycleEvent::TerminateIssued, "test", t0)
            .expect("terminating");
        assert!(reg.plan("f", &limits(), t0).is_empty());
    }

    #[test]
    fn a_scale_in_victim_the_group_terminates_itself_is_not_decremented() {
        let t0 = Instant::now();
        let mut reg = aws_registry();
        pass(&mut reg, &group(&["a"], 1), t0);
        let id = serve(&mut reg, "a", 1, t0);
        reg.choose_for_drain(&id, true, "scale-in", t0)
            .expect("drain");
        view(&mut reg)
            .terminating_wait
            .insert(InstanceId::from("a"));
        pass(&mut reg, &group(&["a"], 1), t0);
        assert!(
            reg.minions[&id]
                .drain
                .as_ref()
                .is_some_and(|d| !d.decrement)
        );
        drained(&mut reg, &id, t0);
        assert_eq!(
            finishes(&reg.plan("f", &limits(), t0)),
            [(Finish::ContinueTermination, false)]
        );
    }

    #[test]
    fn the_controllers_own_terminate_under_the_hook_is_continued() {
        let t0 = Instant::now();
        let mut reg = aws_registry();
        pass(&mut reg, &group(&["a"], 1), t0);
        let id = serve(&mut reg, "a", 1, t0);
        reg.choose_for_drain(&id, true, "scale-in", t0)
            .expect("drain");
        drained(&mut reg, &id, t0);
        assert_eq!(
            finishes(&reg.plan("f", &limits(), t0)),
            [(Finish::Terminate, true)]
        );
        reg.transition(&id, LifecycleEvent::TerminateIssued, "test", t0)
            .expect("terminating");
        view(&mut reg)
            .terminating_wait
            .insert(InstanceId::from("a"));
        assert_eq!(
            finishes(&reg.plan("f", &limits(), t0)),
            [(Finish::ContinueTermination, false)]
        );
    }

    #[test]
    fn on_aws_a_lost_minion_is_reported_unhealthy_for_the_group_to_replace() {
        let t0 = Instant::now();
        let mut reg = aws_registry();
        let g = group(&["a"], 1);
        pass(&mut reg, &g, t0);
        let id = serve(&mut reg, "a", 1, t0);
        pass(&mut reg, &g, t0 + LOST + Duration::from_secs(1));
        assert_eq!(reg.minions[&id].state, MinionState::Lost);
        assert_eq!(
            finishes(&reg.plan("f", &limits(), t0)),
            [(Finish::MarkUnhealthy, false)]
        );
    }

    #[test]
    fn on_aws_a_minion_that_never_joins_is_abandoned_or_marked_unhealthy() {
        let t0 = Instant::now();
        let late = t0 + JOIN + Duration::from_secs(1);
        let mut reg = aws_registry();
        let mut g = group(&["held", "running"], 2);
        g.instances[0].lifecycle = InstanceLifecycle::Pending;
        view(&mut reg).pending_wait.insert(InstanceId::from("held"));
        pass(&mut reg, &g, t0);
        pass(&mut reg, &g, late);
        for i in ["held", "running"] {
            let id = reg.find(i).expect("known").id.clone();
            drained(&mut reg, &id, late);
        }
        let plan = reg.plan("f", &limits(), late);
        let mut got = finishes(&plan);
        got.sort_by_key(|(f, _)| format!("{f:?}"));
        assert_eq!(
            got,
            [
                (Finish::AbandonLaunch, false),
                (Finish::MarkUnhealthy, false)
            ]
        );
    }

    #[test]
    fn a_never_joined_scale_in_victim_is_still_terminated_with_decrement() {
        let t0 = Instant::now();
        let mut reg = aws_registry();
        pass(&mut reg, &group(&["a"], 1), t0);
        let id = reg.find("a").expect("known").id.clone();
        reg.choose_for_drain(&id, true, "scale-in", t0)
            .expect("drain");
        drained(&mut reg, &id, t0);
        assert_eq!(
            finishes(&reg.plan("f", &limits(), t0)),
            [(Finish::Terminate, true)]
        );
    }

    #[test]
    fn the_launching_hook_is_continued_once_the_engine_is_healthy() {
        let t0 = Instant::now();
        let mut reg = aws_registry();
        let mut g = group(&["a"], 1);
        g.instances[0].lifecycle = InstanceLifecycle::Pending;
        view(&mut reg).pending_wait.insert(InstanceId::from("a"));
        pass(&mut reg, &g, t0);
        assert!(reg.plan("f", &limits(), t0).is_empty());
        let (id, _) = reg
            .join("f", &InstanceId::from("a"), ([127, 0, 0, 1], 1).into(), t0)
            .expect("join");
        assert!(
            reg.plan("f", &limits(), t0).is_empty(),
            "joined, engine not healthy yet"
        );
        let id = serve_joined(&mut reg, &id, t0);
        let plan = reg.plan("f", &limits(), t0);
        assert!(
            matches!(
                &plan[..],
                [Action::CompleteLaunch { .. }, Action::Register { .. }]
            ),
            "{plan:?}"
        );
        reg.minions.get_mut(&id).expect("minion").launch_completed = true;
        assert!(
            !reg.plan("f", &limits(), t0)
                .iter()
                .any(|a| matches!(a, Action::CompleteLaunch { .. }))
        );
    }

    /// Opens a session for a joined minion and reports a healthy engine.
    fn serve_joined(reg: &mut Registry, id: &str, now: Instant) -> String {
        let token = reg.minions[id].session_token.clone().expect("token");
        let (tx, rx) = mpsc::channel(4);
        std::mem::forget(rx);
        reg.attach_session(id, &token, tx, Duration::from_secs(60), now)
            .expect("session");
        let g = generation(reg, id);
        reg.report(
            id,
            g,
            Report {
                seq: 1,
                healthy: true,
                ..Default::default()
            },
            now,
        );
        assert_eq!(reg.minions[id].state, MinionState::Ready);
        id.to_owned()
    }

    #[test]
    fn busy_minions_are_protected_from_the_groups_scale_in_until_idle() {
        let t0 = Instant::now();
        let mut reg = aws_registry();
        pass(&mut reg, &group(&["a", "b"], 2), t0);
        let a = serve(&mut reg, "a", 1, t0);
        serve(&mut reg, "b", 2, t0);
        view(&mut reg).in_service = ["a", "b"].into_iter().map(InstanceId::from).collect();
        assert!(reg.plan("f", &limits(), t0).is_empty());
        load(&mut reg, &a, 2, 5, t0);
        assert_eq!(
            reg.plan("f", &limits(), t0),
            [Action::Protect {
                instances: vec!["a".to_owned()],
                protected: true
            }]
        );
        view(&mut reg).protected.insert(InstanceId::from("a"));
        assert!(
            reg.plan("f", &limits(), t0 + Duration::from_secs(1))
                .is_empty(),
            "no call while nothing changes"
        );
        // Both still report, with no work.
        let later = t0 + PROTECT_AFTER_WORK;
        load(&mut reg, &a, 3, 0, later);
        let b = reg.find("b").expect("b").id.clone();
        load(&mut reg, &b, 3, 0, later);
        assert_eq!(
            reg.plan("f", &limits(), later),
            [Action::Protect {
                instances: vec!["a".to_owned()],
                protected: false
            }]
        );
    }

    #[test]
    fn connections_are_shed_onto_a_new_minion_over_its_session_once_per_cooldown() {
        let t0 = Instant::now();
        let mut reg = registry(0, 5);
        let mut events = reg.events.subscribe();
        let g = group(&["a", "b"], 2);
        pass(&mut reg, &g, t0);
        let a = serve(&mut reg, "a", 1, t0);
        let b = serve(&mut reg, "b", 2, t0);
        let (tx, mut commands) = mpsc::channel(4);
        reg.minions
            .get_mut(&a)
            .and_then(|m| m.session.as_mut())
            .expect("a's session")
            .tx = tx;
        let held = |seq, connections| Report {
            seq,
            healthy: true,
            open_connections: connections,
            can_shed: true,
            ..Default::default()
        };
        let ga = generation(&reg, &a);
        reg.report(&a, ga, held(2, 16), t0);
        let gb = generation(&reg, &b);
        reg.report(&b, gb, held(2, 0), t0);

        let shed = |actions: Vec<Action>| -> Vec<(String, u64, String)> {
            actions
                .into_iter()
                .filter_map(|a| match a {
                    Action::Shed { id, count, reason } => Some((id, count, reason)),
                    _ => None,
                })
                .collect()
        };
        let asked = shed(pass(&mut reg, &g, t0));
        assert_eq!(
            asked
                .iter()
                .map(|(id, n, _)| (id.as_str(), *n))
                .collect::<Vec<_>>(),
            [(a.as_str(), 8)]
        );
        let (id, count, reason) = &asked[0];
        assert!(reg.ask_to_shed("f", id, *count, reason, t0));
        match commands.try_recv() {
            Ok(Ok(Command::Shed { count, .. })) => assert_eq!(count, 8),
            other => panic!("expected a Shed command, got {other:?}"),
        }
        let said: Vec<String> = std::iter::from_fn(|| events.try_recv().ok())
            .map(|e| e.message)
            .collect();
        assert!(
            said.contains(&"asked to shed 8 connections: holds 16 connections, fair share 8 over 2 in-service minions".to_owned()),
            "{said:#?}"
        );
        // Its next reports still show 16: not asked again within the
        // cooldown, asked again after it.
        let t1 = t0 + Duration::from_secs(1);
        reg.report(&a, ga, held(3, 16), t1);
        assert_eq!(shed(pass(&mut reg, &g, t1)), []);
        let t2 = t0 + gru_core::rebalance::DEFAULT_REBALANCE.cooldown;
        reg.report(&a, ga, held(4, 16), t2);
        assert_eq!(shed(pass(&mut reg, &g, t2)).len(), 1);
        // Spread: nothing to do.
        reg.report(&a, ga, held(5, 8), t2);
        reg.report(&b, gb, held(3, 8), t2);
        assert_eq!(shed(pass(&mut reg, &g, t2 + Duration::from_secs(60))), []);
    }

    #[test]
    fn a_claim_whose_answer_was_lost_is_recorded_as_a_decrement_once_the_instance_is_gone() {
        let t0 = Instant::now();
        let mut reg = registry(0, 5);
        let mut events = reg.events.subscribe();
        pass(&mut reg, &group(&["a", "b"], 2), t0);
        let id = serve(&mut reg, "a", 1, t0);
        let a = InstanceId::from("a");
        assert_eq!(
            reg.claim_decrement(&id, &a, false, t0).expect("claim"),
            DecrementClaim::Claimed
        );
        // The terminate call went out; its answer never came back (a
        // controller killed in between). The group no longer lists it.
        let t1 = t0 + Duration::from_secs(2);
        pass(&mut reg, &group(&["b"], 1), t1);
        let said: Vec<String> = std::iter::from_fn(|| events.try_recv().ok())
            .filter(|e| e.minion.as_deref() == Some(id.as_str()))
            .map(|e| e.message)
            .collect();
        assert_eq!(
            said.iter()
                .filter(|m| m.contains("desired capacity decremented"))
                .count(),
            1,
            "{said:#?}"
        );
        assert_eq!(reg.minions[&id].state, MinionState::Gone, "{said:#?}");
        assert_eq!(
            reg.claim_decrement(&id, &a, false, t1 + 3 * CLAIM_SETTLE)
                .expect("claim"),
            DecrementClaim::Done,
            "confirmed: never decremented again"
        );
    }

    #[test]
    fn an_unconfirmed_decrement_waits_for_the_groups_view_then_decides() {
        let t0 = Instant::now();
        let mut reg = registry(0, 5);
        pass(&mut reg, &group(&["a"], 1), t0);
        let id = serve(&mut reg, "a", 1, t0);
        let a = InstanceId::from("a");
        assert_eq!(
            reg.claim_decrement(&id, &a, false, t0).expect("claim"),
            DecrementClaim::Claimed
        );
        // A controller stopped before the answer: the group still runs it.
        assert_eq!(
            reg.claim_decrement(&id, &a, false, t0 + Duration::from_secs(5))
                .expect("claim"),
            DecrementClaim::Wait,
            "the group's view may lag the call"
        );
        assert_eq!(
            reg.claim_decrement(&id, &a, false, t0 + CLAIM_SETTLE)
                .expect("claim"),
            DecrementClaim::Claimed,
            "the earlier call never took effect: decrement now"
        );
        // The group shows it leaving: that call decremented.
        assert_eq!(
            reg.claim_decrement(&id, &a, true, t0 + CLAIM_SETTLE)
                .expect("claim"),
            DecrementClaim::Done
        );
        assert_eq!(
            reg.claim_decrement(&id, &a, false, t0 + 3 * CLAIM_SETTLE)
                .expect("claim"),
            DecrementClaim::Done,
            "confirmed for good"
        );
    }
}
