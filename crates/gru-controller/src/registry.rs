//! What the controller knows: fleets, minions, and the events between them.
//!
//! All of it sits behind one mutex that is never held across an `.await`:
//! the reconcile loop takes a plan out ([`Registry::plan`]), does the slow
//! cloud calls without the lock, and comes back to record what happened.
//! Every state change goes through [`gru_core::step`].

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use gru_cloud::{GroupState, InstanceId, InstanceLifecycle, Target};
use gru_core::lifecycle::InvalidTransition;
use gru_core::policy::{
    self, Decision, Explanation, MinionLoad, Observation, Overrides, Pin, PolicyState, Source,
};
use gru_core::scaling::Candidate;
use gru_core::{LifecycleEvent, Load, MinionState, step};
use jiff::Timestamp;
use rand::Rng;
use tokio::sync::{broadcast, mpsc};

use crate::config::FleetConfig;

/// How many recent events the controller keeps for `gru events`.
pub const RECENT_EVENTS: usize = 500;
/// Gone minions are listed for this long, then forgotten.
pub const GONE_RETENTION: Duration = Duration::from_secs(3600);
/// On AWS, a minion that reported queued or in-flight work within this is
/// protected from the group's own scale-ins (so those pick idle instances);
/// the window keeps protection from flapping with every report.
pub const PROTECT_AFTER_WORK: Duration = Duration::from_secs(60);

/// A command for a minion's agent, sent down its Session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Drain { deadline: Duration, reason: String },
    Resume,
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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Transition,
    /// A decision that changed the desired size.
    Decision,
    Scale,
    Step,
    Warning,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Transition => "transition",
            EventKind::Decision => "decision",
            EventKind::Scale => "scale",
            EventKind::Step => "step",
            EventKind::Warning => "warning",
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
}

#[derive(Clone, Debug)]
pub struct HistoryEntry {
    pub from: MinionState,
    pub to: MinionState,
    pub at: SystemTime,
    pub reason: String,
}

/// Where a drain is, between Draining and Drained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainPhase {
    /// Deregistering; waiting until the load balancer sends no new connections.
    Deregistering,
    /// The Drain command was sent; waiting for the agent to report drained.
    Flushing { since: Instant },
}

#[derive(Clone, Debug)]
pub struct DrainPlan {
    /// Lower the group's desired capacity when terminating (scale-in), or not
    /// (replacement).
    pub decrement: bool,
    pub reason: String,
    pub phase: DrainPhase,
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
    pub state: MinionState,
    pub state_since: Instant,
    pub created: Instant,
    pub engine_address: Option<SocketAddr>,
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
}

impl MinionRecord {
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
    pub paused: bool,
    pub pin: Option<Pin>,
    pub policy_state: PolicyState,
    pub last_decision: Option<Decision>,
    pub group: Option<GroupState>,
    /// What only an AWS group shows: instances held by lifecycle hooks, in
    /// service, protected. `None` for other providers (and before the first
    /// AWS pass).
    pub aws: Option<AwsView>,
    /// What the controller learnt about an AWS fleet at its first pass.
    pub aws_setup: Option<AwsSetup>,
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

/// How a Drained (or Lost, or hooked) minion's instance leaves the group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// TerminateInstanceInAutoScalingGroup (decrementing per the action).
    Terminate,
    /// The terminating hook holds the instance: CompleteLifecycleAction
    /// CONTINUE. The group decided the termination; nothing is decremented.
    ContinueTermination,
    /// Never joined while in service, or Lost (AWS): SetInstanceHealth
    /// Unhealthy, so the group replaces it.
    MarkUnhealthy,
    /// Never joined while the launching hook holds it (AWS):
    /// CompleteLifecycleAction ABANDON, so the group replaces it.
    AbandonLaunch,
}

/// A cloud call the reconcile loop makes outside the lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Register {
        minion: String,
        target: Target,
    },
    /// Deregister (idempotent), then start the drain once the target takes no
    /// new connections. `target` is None for minions never registered.
    Deregister {
        minion: String,
        target: Option<Target>,
    },
    /// Terminate a Drained minion once its target is out of the load balancer.
    Terminate {
        minion: String,
        instance: InstanceId,
        target: Option<Target>,
        /// Only for `Finish::Terminate`.
        decrement: bool,
        finish: Finish,
    },
    /// Record a heartbeat for the terminating hook holding the instance.
    Heartbeat {
        minion: String,
        instance: InstanceId,
    },
    /// Complete the launching hook's action with CONTINUE: the minion joined
    /// and its engine is healthy.
    CompleteLaunch {
        minion: String,
        instance: InstanceId,
    },
    /// Protect (or unprotect) instances from the group's own scale-ins.
    Protect {
        instances: Vec<InstanceId>,
        protected: bool,
    },
}

impl Action {
    /// The one minion the action is about, if it is about one.
    pub fn minion(&self) -> Option<&str> {
        match self {
            Action::Register { minion, .. }
            | Action::Deregister { minion, .. }
            | Action::Terminate { minion, .. }
            | Action::Heartbeat { minion, .. }
            | Action::CompleteLaunch { minion, .. } => Some(minion),
            Action::Protect { .. } => None,
        }
    }
}

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
    pub fleets: BTreeMap<String, FleetState>,
    pub minions: BTreeMap<String, MinionRecord>,
    by_instance: HashMap<InstanceId, String>,
    recent: VecDeque<Event>,
    events: broadcast::Sender<Event>,
    next_generation: u64,
}

impl Registry {
    pub fn new(fleets: &[FleetConfig], events: broadcast::Sender<Event>) -> Self {
        let fleets = fleets
            .iter()
            .map(|c| {
                let state = FleetState {
                    config: c.clone(),
                    paused: false,
                    pin: None,
                    policy_state: PolicyState::new(),
                    last_decision: None,
                    group: None,
                    aws: None,
                    aws_setup: None,
                };
                (c.name.clone(), state)
            })
            .collect();
        Registry {
            fleets,
            minions: BTreeMap::new(),
            by_instance: HashMap::new(),
            recent: VecDeque::new(),
            events,
            next_generation: 1,
        }
    }

    pub fn recent_events(&self) -> impl Iterator<Item = &Event> {
        self.recent.iter()
    }

    pub fn emit(&mut self, fleet: &str, minion: Option<&str>, kind: EventKind, message: String) {
        self.push_event(Event {
            at: SystemTime::now(),
            fleet: fleet.to_owned(),
            minion: minion.map(str::to_owned),
            kind,
            message,
            transition: None,
        });
    }

    fn push_event(&mut self, event: Event) {
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
        if self.recent.len() == RECENT_EVENTS {
            self.recent.pop_front();
        }
        self.recent.push_back(event.clone());
        // No subscriber is fine.
        let _ = self.events.send(event);
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
            },
        );
        self.by_instance.insert(instance.clone(), id.clone());
        self.emit(
            fleet,
            Some(&id),
            EventKind::Step,
            format!("instance {instance} discovered"),
        );
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
        m.state = to;
        m.state_since = now;
        let at = SystemTime::now();
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
        self.push_event(Event {
            at,
            fleet,
            minion: Some(id.to_owned()),
            kind: EventKind::Transition,
            message: format!("{from} → {to}: {reason}"),
            transition: Some((from, to)),
        });
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
        m.engine_address = Some(engine_address);
        m.session_token = Some(token.clone());
        m.last_seen = Some(now);
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
        let resend = match &m.drain {
            Some(DrainPlan {
                phase: DrainPhase::Flushing { .. },
                reason,
                ..
            }) => Some(Command::Drain {
                deadline: drain_deadline,
                reason: reason.clone(),
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
        let flushing = matches!(
            m.drain,
            Some(DrainPlan {
                phase: DrainPhase::Flushing { .. },
                ..
            })
        );
        if state == MinionState::Joining && r.healthy {
            return self
                .transition(id, LifecycleEvent::EngineHealthy, "engine healthy", now)
                .is_ok();
        }
        if state == MinionState::Draining && flushing && r.drained {
            return self
                .transition(
                    id,
                    LifecycleEvent::Drained,
                    "queue empty, nothing in flight, no connections",
                    now,
                )
                .is_ok();
        }
        false
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
        if let Some(m) = self.minions.get_mut(id)
            && m.drain.is_none()
        {
            m.drain = Some(DrainPlan {
                decrement,
                reason: reason.to_owned(),
                phase: DrainPhase::Deregistering,
                overdue_reported: false,
            });
        }
        Ok(())
    }

    /// Brings the minions of `fleet` in line with what the group reports:
    /// new instances become Pending minions, vanished ones Gone, silent ones
    /// Lost.
    pub fn sync(
        &mut self,
        fleet: &str,
        group: &GroupState,
        lost_timeout: Duration,
        join_timeout: Duration,
        now: Instant,
    ) {
        let mut hooked = HashSet::new();
        if let Some(f) = self.fleets.get_mut(fleet) {
            f.group = Some(group.clone());
            if let Some(view) = &f.aws {
                hooked = view.terminating_wait.clone();
            }
        }
        for i in &group.instances {
            // An instance held by the terminating hook needs its action
            // completed even if its minion never joined (or the controller
            // restarted): it gets a record too.
            if i.lifecycle != InstanceLifecycle::Terminating
                || self.by_instance.contains_key(&i.id)
                || hooked.contains(&i.id)
            {
                self.ensure_minion(fleet, &i.id, now);
            }
        }
        let listed: std::collections::HashSet<&InstanceId> =
            group.instances.iter().map(|i| &i.id).collect();
        let ids: Vec<String> = self
            .minions
            .values()
            .filter(|m| m.fleet == fleet && m.state != MinionState::Gone)
            .map(|m| m.id.clone())
            .collect();
        for id in ids {
            let Some(m) = self.minions.get(&id) else {
                continue;
            };
            let (state, instance) = (m.state, m.instance.clone());
            let silent_for = now.saturating_duration_since(m.last_seen.unwrap_or(m.created));
            if hooked.contains(&instance) {
                self.held_by_terminating_hook(fleet, &id, now);
            }
            if !listed.contains(&instance) {
                let _ = self.transition(
                    &id,
                    LifecycleEvent::InstanceGone,
                    "instance no longer in the group",
                    now,
                );
                continue;
            }
            if state.expects_reports() && silent_for > lost_timeout {
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
            } else if state == MinionState::Pending && silent_for > join_timeout {
                let reason = format!(
                    "never joined within {}; replacing it",
                    humantime::format_duration(join_timeout)
                );
                let _ = self.choose_for_drain(&id, false, &reason, now);
            }
        }
        // Forget long-gone minions.
        let stale: Vec<String> = self
            .minions
            .values()
            .filter(|m| {
                m.state == MinionState::Gone
                    && now.saturating_duration_since(m.state_since) > GONE_RETENTION
            })
            .map(|m| m.id.clone())
            .collect();
        for id in stale {
            if let Some(m) = self.minions.remove(&id) {
                self.by_instance.remove(&m.instance);
            }
        }
    }

    /// The group (on AWS) started terminating the minion's instance and its
    /// terminating hook holds it: drain it without decrement (the group
    /// already decided), then complete the action instead of terminating.
    fn held_by_terminating_hook(&mut self, fleet: &str, id: &str, now: Instant) {
        let Some(m) = self.minions.get(id) else {
            return;
        };
        let (state, instance) = (m.state, m.instance.clone());
        match state {
            MinionState::Pending
            | MinionState::Joining
            | MinionState::Ready
            | MinionState::InService => {
                let reason =
                    format!("the group is terminating {instance} (terminating lifecycle hook)");
                let _ = self.choose_for_drain(id, false, &reason, now);
            }
            MinionState::Draining | MinionState::Drained | MinionState::Lost => {
                let cleared = self
                    .minions
                    .get_mut(id)
                    .and_then(|m| m.drain.as_mut())
                    .filter(|plan| plan.decrement)
                    .map(|plan| plan.decrement = false)
                    .is_some();
                if cleared {
                    // Chosen for scale-in, but the group got there first: its
                    // termination is the only one, and it decrements or not
                    // by itself.
                    let message = format!(
                        "the group is terminating {instance} itself (terminating lifecycle hook): no decrement from the controller"
                    );
                    self.emit(fleet, Some(id), EventKind::Step, message);
                }
            }
            MinionState::Terminating | MinionState::Gone => {}
        }
    }

    /// The cloud calls the lifecycle of `fleet`'s minions needs next.
    pub fn plan(&mut self, fleet: &str, drain_deadline: Duration, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        let mut overdue = Vec::new();
        let (view, heartbeat_every) = match self.fleets.get(fleet) {
            Some(f) => (
                f.aws.clone(),
                f.config
                    .provider
                    .aws()
                    .map_or(Duration::MAX, |a| a.heartbeat_interval),
            ),
            None => (None, Duration::MAX),
        };
        for m in self.minions.values_mut().filter(|m| m.fleet == fleet) {
            let hooked = view
                .as_ref()
                .is_some_and(|v| v.terminating_wait.contains(&m.instance));
            let held_at_launch = view
                .as_ref()
                .is_some_and(|v| v.pending_wait.contains(&m.instance));
            if hooked
                && matches!(
                    m.state,
                    MinionState::Draining | MinionState::Drained | MinionState::Lost
                )
                && !m.termination_completed
                && m.hook_heartbeat_at
                    .is_none_or(|at| now.saturating_duration_since(at) >= heartbeat_every)
            {
                actions.push(Action::Heartbeat {
                    minion: m.id.clone(),
                    instance: m.instance.clone(),
                });
            }
            if held_at_launch
                && matches!(m.state, MinionState::Ready | MinionState::InService)
                && !m.launch_completed
            {
                actions.push(Action::CompleteLaunch {
                    minion: m.id.clone(),
                    instance: m.instance.clone(),
                });
            }
            match m.state {
                MinionState::Ready => {
                    if let Some(target) = m.target() {
                        actions.push(Action::Register {
                            minion: m.id.clone(),
                            target,
                        });
                    }
                }
                MinionState::Draining => match m.drain.as_mut() {
                    Some(DrainPlan {
                        phase: DrainPhase::Deregistering,
                        ..
                    }) => {
                        let target = if m.registered { m.target() } else { None };
                        actions.push(Action::Deregister {
                            minion: m.id.clone(),
                            target,
                        });
                    }
                    Some(
                        plan @ DrainPlan {
                            phase: DrainPhase::Flushing { .. },
                            ..
                        },
                    ) => {
                        let DrainPhase::Flushing { since } = plan.phase else {
                            continue;
                        };
                        if !plan.overdue_reported
                            && now.saturating_duration_since(since) > drain_deadline
                        {
                            plan.overdue_reported = true;
                            overdue.push(m.id.clone());
                        }
                    }
                    None => {}
                },
                MinionState::Drained | MinionState::Lost => {
                    let decrement = m.drain.as_ref().is_some_and(|d| d.decrement);
                    let never_joined = m.session_token.is_none();
                    let finish = if view.is_none() {
                        Finish::Terminate
                    } else if hooked {
                        Finish::ContinueTermination
                    } else if never_joined && !decrement && held_at_launch {
                        Finish::AbandonLaunch
                    } else if (never_joined || m.state == MinionState::Lost) && !decrement {
                        // Never joined, or went silent: report it unhealthy
                        // and let the group replace it (DESIGN.md, Lost).
                        Finish::MarkUnhealthy
                    } else {
                        Finish::Terminate
                    };
                    let target = if m.registered { m.target() } else { None };
                    actions.push(Action::Terminate {
                        minion: m.id.clone(),
                        instance: m.instance.clone(),
                        target,
                        decrement: decrement && finish == Finish::Terminate,
                        finish,
                    });
                }
                // The controller's own terminate put the instance in
                // Terminating:Wait: it is drained, so complete at once.
                MinionState::Terminating if hooked && !m.termination_completed => {
                    actions.push(Action::Terminate {
                        minion: m.id.clone(),
                        instance: m.instance.clone(),
                        target: None,
                        decrement: false,
                        finish: Finish::ContinueTermination,
                    });
                }
                _ => {}
            }
        }
        if let Some(view) = &view {
            actions.extend(self.protection(fleet, view, now));
        }
        for id in overdue {
            self.emit(
                fleet,
                Some(&id),
                EventKind::Warning,
                format!(
                    "drain overdue: still working after {}; it will not be terminated while it holds work",
                    humantime::format_duration(drain_deadline)
                ),
            );
        }
        actions
    }

    /// Scale-in protection changes for an AWS fleet: minions in service that
    /// had work within [`PROTECT_AFTER_WORK`] are protected, the others not.
    /// Only instances in service in the group are touched, and only when
    /// their protection differs.
    fn protection(&self, fleet: &str, view: &AwsView, now: Instant) -> Vec<Action> {
        let mut protect = Vec::new();
        let mut unprotect = Vec::new();
        for m in self.minions.values().filter(|m| m.fleet == fleet) {
            if !view.in_service.contains(&m.instance) {
                continue;
            }
            let busy = matches!(m.state, MinionState::Ready | MinionState::InService)
                && m.last_busy_at
                    .is_some_and(|at| now.saturating_duration_since(at) < PROTECT_AFTER_WORK);
            match (busy, view.protected.contains(&m.instance)) {
                (true, false) => protect.push(m.instance.clone()),
                (false, true) => unprotect.push(m.instance.clone()),
                _ => {}
            }
        }
        [(protect, true), (unprotect, false)]
            .into_iter()
            .filter(|(instances, _)| !instances.is_empty())
            .map(|(instances, protected)| Action::Protect {
                instances,
                protected,
            })
            .collect()
    }

    /// True while some minion of the fleet is between Draining and Gone, so
    /// the loop should come back sooner than the evaluation interval.
    pub fn busy(&self, fleet: &str) -> bool {
        self.minions.values().any(|m| {
            m.fleet == fleet
                && matches!(
                    m.state,
                    MinionState::Ready
                        | MinionState::Draining
                        | MinionState::Drained
                        | MinionState::Terminating
                        | MinionState::Lost
                )
        })
    }

    /// Runs the policy for `fleet` at `now` (`wall` is the same moment on
    /// the wall clock, for schedules): records the decision, chooses victims
    /// for scale-in, and returns the group's desired capacity to set, if it
    /// must grow.
    pub fn decide(&mut self, fleet: &str, now: Instant, wall: Timestamp) -> Option<u32> {
        let minions: Vec<&MinionRecord> =
            self.minions.values().filter(|m| m.fleet == fleet).collect();
        let capacity = minions
            .iter()
            .filter(|m| m.state.counts_as_capacity())
            .count() as u32;
        let loads: Vec<MinionLoad> = minions
            .iter()
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
        // Minions that will lower the group's desired capacity when they are
        // terminated; the group's desired count includes them until then.
        let pending_decrements = minions
            .iter()
            .filter(|m| {
                matches!(
                    m.state,
                    MinionState::Draining | MinionState::Drained | MinionState::Lost
                )
            })
            .filter(|m| m.drain.as_ref().is_some_and(|d| d.decrement))
            .count() as u32;
        let candidates: Vec<Candidate<String>> = minions
            .iter()
            .map(|m| Candidate {
                id: m.id.clone(),
                state: m.state,
                load: m.load(),
            })
            .collect();

        let f = self.fleets.get_mut(fleet)?;
        if f.last_decision.is_none() {
            // A controller that just started has no history: count the
            // capacity it found as recommended now, so it does not scale in
            // before a whole stabilization window has passed.
            f.policy_state.record_recommendation(wall, capacity);
        }
        let obs = Observation {
            capacity,
            minions: loads,
            external: Vec::new(),
        };
        let overrides = Overrides {
            paused: f.paused,
            pin: f.pin,
        };
        let decision = policy::evaluate(
            &f.config.policy,
            &mut f.policy_state,
            &obs,
            &overrides,
            wall,
        );
        let changed = f
            .last_decision
            .as_ref()
            .is_none_or(|d| d.desired != decision.desired);
        let desired = decision.desired;
        let applied = decision.applied;
        let group = f.group.clone();
        let line = summary(&decision.explanation);
        f.last_decision = Some(decision);
        if changed {
            self.emit(fleet, None, EventKind::Decision, line);
        }
        if !applied {
            return None;
        }
        if capacity > desired {
            let victims = gru_core::pick_victims(&candidates, (capacity - desired) as usize);
            for id in victims {
                let reason = format!("scale-in to {desired}");
                if let Err(e) = self.choose_for_drain(&id, true, &reason, now) {
                    tracing::warn!(minion = %id, error = %e, "could not choose for drain");
                }
            }
        }
        let group = group?;
        let want = desired.saturating_add(pending_decrements);
        if want > group.desired {
            let clipped = want.min(group.max);
            if clipped < want {
                self.emit(
                    fleet,
                    None,
                    EventKind::Warning,
                    format!("the group's own max {} clips desired {want}", group.max),
                );
            }
            return (clipped > group.desired).then_some(clipped);
        }
        None
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

    fn registry(min: u32, max: u32) -> Registry {
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
        let fleet = FleetConfig {
            name: "f".to_owned(),
            policy,
            provider: ProviderConfig::Local(LocalProviderConfig {
                listen: "127.0.0.1:0".parse().expect("addr"),
                minion_config: "m.toml".into(),
                deregistration_delay: Duration::from_secs(300),
                log_dir: None,
            }),
        };
        Registry::new(&[fleet], broadcast::channel(64).0)
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
    fn scale_in_drains_the_least_loaded_and_never_lowers_desired_directly() {
        let t0 = Instant::now();
        let mut reg = registry(1, 5);
        let g = group(&["a", "b", "c"], 3);
        reg.sync("f", &g, LOST, JOIN, t0);
        let ids: Vec<String> = ["a", "b", "c"]
            .iter()
            .zip(1..)
            .map(|(i, p)| serve(&mut reg, i, p, t0))
            .collect();
        for (id, q) in ids.iter().zip([10, 1, 5]) {
            load(&mut reg, id, 2, q, t0);
        }
        reg.fleets.get_mut("f").expect("fleet").pin = Some(Pin {
            desired: 1,
            until: None,
        });
        // The group already holds 3 = 1 wanted + 2 to be decremented on termination.
        assert_eq!(reg.decide("f", t0, wall(t0, t0)), None);
        let states: Vec<MinionState> = ids.iter().map(|id| reg.minions[id].state).collect();
        assert_eq!(
            states,
            [
                MinionState::InService,
                MinionState::Draining,
                MinionState::Draining
            ]
        );
        assert!(
            ids[1..]
                .iter()
                .all(|id| reg.minions[id].drain.as_ref().is_some_and(|d| d.decrement))
        );
        // A second pass chooses nobody else.
        assert_eq!(reg.decide("f", t0, wall(t0, t0)), None);
        assert_eq!(
            reg.minions
                .values()
                .filter(|m| m.state == MinionState::Draining)
                .count(),
            2
        );

        // Wanting 3 again while two still drain: the group must hold 3 + 2.
        reg.fleets.get_mut("f").expect("fleet").pin = Some(Pin {
            desired: 3,
            until: None,
        });
        assert_eq!(reg.decide("f", t0, wall(t0, t0)), Some(5));
    }

    #[test]
    fn a_drained_minion_is_terminated_once_with_its_decrement() {
        let t0 = Instant::now();
        let mut reg = registry(0, 5);
        reg.sync("f", &group(&["a"], 1), LOST, JOIN, t0);
        let id = serve(&mut reg, "a", 1, t0);
        reg.choose_for_drain(&id, true, "test", t0).expect("drain");
        let plan = reg.plan("f", Duration::from_secs(60), t0);
        assert!(
            matches!(
                &plan[..],
                [Action::Deregister {
                    target: Some(_),
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
        assert_eq!(reg.minions[&id].state, MinionState::Draining);
        reg.minions
            .get_mut(&id)
            .expect("minion")
            .drain
            .as_mut()
            .expect("plan")
            .phase = DrainPhase::Flushing { since: t0 };
        assert!(reg.report(&id, g, Report { seq: 4, ..drained }, t0));
        assert_eq!(reg.minions[&id].state, MinionState::Drained);
        let plan = reg.plan("f", Duration::from_secs(60), t0);
        assert!(
            matches!(
                &plan[..],
                [Action::Terminate {
                    decrement: true,
                    ..
                }]
            ),
            "{plan:?}"
        );
        reg.transition(&id, LifecycleEvent::TerminateIssued, "test", t0)
            .expect("terminating");
        assert!(
            reg.plan("f", Duration::from_secs(60), t0).is_empty(),
            "no second terminate"
        );
    }

    #[test]
    fn a_silent_minion_is_lost_and_replaced_without_decrement() {
        let t0 = Instant::now();
        let mut reg = registry(0, 5);
        reg.sync("f", &group(&["a"], 1), LOST, JOIN, t0);
        let id = serve(&mut reg, "a", 1, t0);
        reg.sync("f", &group(&["a"], 1), LOST, JOIN, t0 + LOST);
        assert_eq!(reg.minions[&id].state, MinionState::InService, "not yet");
        reg.sync(
            "f",
            &group(&["a"], 1),
            LOST,
            JOIN,
            t0 + LOST + Duration::from_secs(1),
        );
        assert_eq!(reg.minions[&id].state, MinionState::Lost);
        let plan = reg.plan("f", Duration::from_secs(60), t0);
        assert!(
            matches!(
                &plan[..],
                [Action::Terminate {
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
        reg.sync("f", &group(&["a"], 1), LOST, JOIN, t0);
        let id = reg.find("a").expect("discovered").id.clone();
        reg.sync(
            "f",
            &group(&["a"], 1),
            LOST,
            JOIN,
            t0 + JOIN + Duration::from_secs(1),
        );
        let m = &reg.minions[&id];
        assert_eq!(m.state, MinionState::Draining);
        assert!(
            m.drain.as_ref().is_some_and(|d| !d.decrement),
            "replaced, not scaled in"
        );
        let plan = reg.plan("f", Duration::from_secs(60), t0);
        assert!(
            matches!(&plan[..], [Action::Deregister { target: None, .. }]),
            "{plan:?}"
        );
    }

    #[test]
    fn a_fresh_controller_waits_a_window_before_scaling_in() {
        let t0 = Instant::now();
        let mut reg = registry(0, 5);
        reg.sync("f", &group(&["a", "b"], 2), LOST, JOIN, t0);
        serve(&mut reg, "a", 1, t0);
        serve(&mut reg, "b", 2, t0);
        reg.decide("f", t0, wall(t0, t0));
        assert_eq!(
            reg.minions
                .values()
                .filter(|m| m.state == MinionState::Draining)
                .count(),
            0
        );
        let t1 = t0 + Duration::from_secs(31);
        reg.decide("f", t1, wall(t0, t1));
        assert_eq!(
            reg.minions
                .values()
                .filter(|m| m.state == MinionState::Draining)
                .count(),
            2
        );
    }

    #[test]
    fn vanished_instances_are_gone_and_stale_reports_ignored() {
        let t0 = Instant::now();
        let mut reg = registry(0, 5);
        reg.sync("f", &group(&["a"], 1), LOST, JOIN, t0);
        let id = serve(&mut reg, "a", 1, t0);
        load(&mut reg, &id, 5, 7, t0);
        load(&mut reg, &id, 4, 99, t0);
        assert_eq!(
            reg.minions[&id].load().queue_depth,
            7,
            "an older report does not overwrite a newer one"
        );
        reg.sync("f", &group(&[], 0), LOST, JOIN, t0);
        assert_eq!(reg.minions[&id].state, MinionState::Gone);
    }

    fn aws_registry() -> Registry {
        let mut reg = registry(0, 5);
        let f = reg.fleets.get_mut("f").expect("fleet");
        f.config.provider = ProviderConfig::Aws(crate::config::AwsProviderConfig {
            fleet: gru_aws::AwsFleetConfig::new(
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
        let m = reg.minions.get_mut(id).expect("minion");
        m.drain.as_mut().expect("plan").phase = DrainPhase::Flushing { since: now };
        reg.transition(id, LifecycleEvent::Drained, "test", now)
            .expect("drained");
    }

    fn finishes(plan: &[Action]) -> Vec<(Finish, bool)> {
        plan.iter()
            .filter_map(|a| match a {
                Action::Terminate {
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
        reg.sync("f", &group(&["a"], 1), LOST, JOIN, t0);
        let id = serve(&mut reg, "a", 1, t0);
        view(&mut reg)
            .terminating_wait
            .insert(InstanceId::from("a"));
        let mut g = group(&["a"], 1);
        g.instances[0].lifecycle = InstanceLifecycle::Terminating;
        reg.sync("f", &g, LOST, JOIN, t0);
        let m = &reg.minions[&id];
        assert_eq!(m.state, MinionState::Draining);
        assert!(
            m.drain.as_ref().is_some_and(|d| !d.decrement),
            "the group already decided"
        );
        let plan = reg.plan("f", Duration::from_secs(60), t0);
        assert!(
            matches!(
                &plan[..],
                [
                    Action::Heartbeat { .. },
                    Action::Deregister {
                        target: Some(_),
                        ..
                    }
                ]
            ),
            "{plan:?}"
        );
        // Recorded: the next one is due only after the interval.
        reg.minions.get_mut(&id).expect("minion").hook_heartbeat_at = Some(t0);
        let soon = reg.plan("f", Duration::from_secs(60), t0 + Duration::from_secs(1));
        assert!(
            !soon.iter().any(|a| matches!(a, Action::Heartbeat { .. })),
            "{soon:?}"
        );
        let later = reg.plan("f", Duration::from_secs(60), t0 + Duration::from_secs(30));
        assert!(
            later.iter().any(|a| matches!(a, Action::Heartbeat { .. })),
            "{later:?}"
        );

        drained(&mut reg, &id, t0);
        let plan = reg.plan("f", Duration::from_secs(60), t0);
        assert_eq!(finishes(&plan), [(Finish::ContinueTermination, false)]);
        reg.minions
            .get_mut(&id)
            .expect("minion")
            .termination_completed = true;
        reg.transition(&id, LifecycleEvent::TerminateIssued, "test", t0)
            .expect("terminating");
        assert!(reg.plan("f", Duration::from_secs(60), t0).is_empty());
    }

    #[test]
    fn a_scale_in_victim_the_group_terminates_itself_is_not_decremented() {
        let t0 = Instant::now();
        let mut reg = aws_registry();
        reg.sync("f", &group(&["a"], 1), LOST, JOIN, t0);
        let id = serve(&mut reg, "a", 1, t0);
        reg.choose_for_drain(&id, true, "scale-in", t0)
            .expect("drain");
        view(&mut reg)
            .terminating_wait
            .insert(InstanceId::from("a"));
        reg.sync("f", &group(&["a"], 1), LOST, JOIN, t0);
        assert!(
            reg.minions[&id]
                .drain
                .as_ref()
                .is_some_and(|d| !d.decrement)
        );
        drained(&mut reg, &id, t0);
        assert_eq!(
            finishes(&reg.plan("f", Duration::from_secs(60), t0)),
            [(Finish::ContinueTermination, false)]
        );
    }

    #[test]
    fn the_controllers_own_terminate_under_the_hook_is_continued() {
        let t0 = Instant::now();
        let mut reg = aws_registry();
        reg.sync("f", &group(&["a"], 1), LOST, JOIN, t0);
        let id = serve(&mut reg, "a", 1, t0);
        reg.choose_for_drain(&id, true, "scale-in", t0)
            .expect("drain");
        drained(&mut reg, &id, t0);
        assert_eq!(
            finishes(&reg.plan("f", Duration::from_secs(60), t0)),
            [(Finish::Terminate, true)]
        );
        reg.transition(&id, LifecycleEvent::TerminateIssued, "test", t0)
            .expect("terminating");
        view(&mut reg)
            .terminating_wait
            .insert(InstanceId::from("a"));
        assert_eq!(
            finishes(&reg.plan("f", Duration::from_secs(60), t0)),
            [(Finish::ContinueTermination, false)]
        );
    }

    #[test]
    fn on_aws_a_lost_minion_is_reported_unhealthy_for_the_group_to_replace() {
        let t0 = Instant::now();
        let mut reg = aws_registry();
        let g = group(&["a"], 1);
        reg.sync("f", &g, LOST, JOIN, t0);
        let id = serve(&mut reg, "a", 1, t0);
        reg.sync("f", &g, LOST, JOIN, t0 + LOST + Duration::from_secs(1));
        assert_eq!(reg.minions[&id].state, MinionState::Lost);
        assert_eq!(
            finishes(&reg.plan("f", Duration::from_secs(60), t0)),
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
        reg.sync("f", &g, LOST, JOIN, t0);
        reg.sync("f", &g, LOST, JOIN, late);
        for i in ["held", "running"] {
            let id = reg.find(i).expect("known").id.clone();
            drained(&mut reg, &id, late);
        }
        let plan = reg.plan("f", Duration::from_secs(60), late);
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
        reg.sync("f", &group(&["a"], 1), LOST, JOIN, t0);
        let id = reg.find("a").expect("known").id.clone();
        reg.choose_for_drain(&id, true, "scale-in", t0)
            .expect("drain");
        drained(&mut reg, &id, t0);
        assert_eq!(
            finishes(&reg.plan("f", Duration::from_secs(60), t0)),
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
        reg.sync("f", &g, LOST, JOIN, t0);
        assert!(reg.plan("f", Duration::from_secs(60), t0).is_empty());
        let (id, _) = reg
            .join("f", &InstanceId::from("a"), ([127, 0, 0, 1], 1).into(), t0)
            .expect("join");
        assert!(
            reg.plan("f", Duration::from_secs(60), t0).is_empty(),
            "joined, engine not healthy yet"
        );
        let id = serve_joined(&mut reg, &id, t0);
        let plan = reg.plan("f", Duration::from_secs(60), t0);
        assert!(
            matches!(
                &plan[..],
                [Action::CompleteLaunch { .. }, Action::Register { .. }]
            ),
            "{plan:?}"
        );
        reg.minions.get_mut(&id).expect("minion").launch_completed = true;
        assert!(
            !reg.plan("f", Duration::from_secs(60), t0)
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
        reg.sync("f", &group(&["a", "b"], 2), LOST, JOIN, t0);
        let a = serve(&mut reg, "a", 1, t0);
        serve(&mut reg, "b", 2, t0);
        view(&mut reg).in_service = ["a", "b"].into_iter().map(InstanceId::from).collect();
        assert!(reg.plan("f", Duration::from_secs(60), t0).is_empty());
        load(&mut reg, &a, 2, 5, t0);
        assert_eq!(
            reg.plan("f", Duration::from_secs(60), t0),
            [Action::Protect {
                instances: vec![InstanceId::from("a")],
                protected: true
            }]
        );
        view(&mut reg).protected.insert(InstanceId::from("a"));
        assert!(
            reg.plan("f", Duration::from_secs(60), t0 + Duration::from_secs(1))
                .is_empty(),
            "no call while nothing changes"
        );
        assert_eq!(
            reg.plan("f", Duration::from_secs(60), t0 + PROTECT_AFTER_WORK),
            [Action::Protect {
                instances: vec![InstanceId::from("a")],
                protected: false
            }]
        );
    }
}
