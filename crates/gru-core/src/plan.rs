//! The pure planner: from a fleet's minions as the controller knows them,
//! the cloud's view of the group and the times already measured against
//! `now`, what this reconcile pass must change and which cloud calls it
//! must make (DESIGN.md, "Inside the controller").
//!
//! Start at [`plan`]. The shell builds a [`MinionSnapshot`] per minion (every
//! clock reading turned into an age), a [`CloudView`], and applies the
//! [`Plan`]: each [`Change`] through the lifecycle's `step`, then each
//! [`Action`] as a cloud call (writing its intent first). [`scale`] turns
//! the policy's decision into victims and the group's new size.
//!
//! Invariants, property-tested below: a Terminate only for a minion that is
//! Drained, Lost or already Terminating; never a Register for a minion on
//! its way out; a decrement only for a minion whose drain asked for one;
//! draining minions never count as capacity; the size asked of the group
//! never exceeds its max.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use crate::lifecycle::{DrainPhase, MinionState};
use crate::rebalance::{Holder, RebalanceLimits, rebalance};
use crate::scaling::{Candidate, Load, pick_victims};

/// An instance as the capacity group lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listed {
    /// Launched, not yet in service in the group.
    Pending,
    /// Running and counted by the group.
    InService,
    /// Termination started; the instance still exists.
    Terminating,
}

/// What the cloud shows this pass.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CloudView<'a> {
    /// Every instance the group lists, by instance id.
    pub instances: BTreeMap<Cow<'a, str>, Listed>,
    /// What only a group with lifecycle hooks shows (AWS); `None` otherwise.
    pub hooks: Option<HookView<'a>>,
}

/// Lifecycle hook wait states and protection of an AWS group's instances.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HookView<'a> {
    /// Held in `Pending:Wait` by the launching hook.
    pub pending_wait: BTreeSet<Cow<'a, str>>,
    /// Held in `Terminating:Wait` by the terminating hook.
    pub terminating_wait: BTreeSet<Cow<'a, str>>,
    /// In service in the group.
    pub in_service: BTreeSet<Cow<'a, str>>,
    /// Protected from the group's own scale-ins.
    pub protected: BTreeSet<Cow<'a, str>>,
}

/// The drain on record for a minion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrainIntent {
    /// Lower the group's desired capacity when terminating (scale-in), or
    /// not (replacement).
    pub decrement: bool,
    pub overdue_reported: bool,
}

/// One minion as the planner sees it. Every time is an age at `now`,
/// measured by the shell with the one clock reading of the pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MinionSnapshot<'a> {
    pub id: Cow<'a, str>,
    pub instance: Cow<'a, str>,
    pub state: MinionState,
    pub in_state_for: Duration,
    /// Since the last sign of life (join, Session, report), or since the
    /// record was made when there was none.
    pub silent_for: Duration,
    /// The agent joined at least once (its engine address is known).
    pub joined: bool,
    pub registered: bool,
    /// Found in service by a restarted controller: register it once more.
    pub verify_registration: bool,
    pub drain: Option<DrainIntent>,
    pub load: Load,
    /// Since the last report with queued or in-flight work.
    pub since_busy: Option<Duration>,
    /// Since the last lifecycle heartbeat for the terminating hook.
    pub since_heartbeat: Option<Duration>,
    pub launch_completed: bool,
    pub termination_completed: bool,
    /// Open connections, as last reported.
    pub connections: u64,
    /// Its engine closes connections when asked ([`Action::Shed`]).
    pub can_shed: bool,
    /// Since it was last asked to shed connections.
    pub since_shed: Option<Duration>,
}

/// The limits a pass plans by, from the controller's config.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    pub lost_timeout: Duration,
    pub join_timeout: Duration,
    pub unhealthy_timeout: Duration,
    pub drain_deadline: Duration,
    /// Lifecycle heartbeats for an instance the terminating hook holds.
    pub heartbeat_every: Duration,
    /// A Terminating minion whose instance still runs is terminated again.
    pub terminate_retry_after: Duration,
    /// A minion with work within this is protected from the group's own
    /// scale-ins (AWS).
    pub protect_after_work: Duration,
    /// How in-service minions' connections are spread; `None`: they are
    /// not (only the engines' `max_connection_age` moves them).
    pub rebalance: Option<RebalanceLimits>,
}

/// A change to one minion's record that the pass decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The group no longer lists the instance.
    Gone { id: String },
    /// No sign of life within the lost timeout.
    Lost { id: String, silent_for: Duration },
    /// Chosen for a drain, with or without decrement.
    Drain {
        id: String,
        decrement: bool,
        reason: String,
    },
    /// The group's terminating hook holds an instance the controller chose
    /// for scale-in: the group's termination is the only one, the
    /// controller does not decrement.
    NoDecrement { id: String },
    /// The drain passed its deadline: report it once.
    Overdue { id: String },
    /// A Terminating minion's terminate is asked again: its clock restarts.
    RetryTerminate { id: String },
}

/// How a Drained, Lost or hooked minion's instance leaves the group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// Terminate the instance (with the decrement the drain asked for).
    Terminate,
    /// The terminating hook holds the instance: complete it with CONTINUE.
    ContinueTermination,
    /// Never joined, or Lost, while in service (AWS): report it unhealthy
    /// so the group replaces it.
    MarkUnhealthy,
    /// Never joined while the launching hook holds it (AWS): ABANDON.
    AbandonLaunch,
}

/// A cloud call of this pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Register the minion's engine in the load balancer.
    Register { id: String },
    /// Take an unhealthy engine out of the load balancer.
    TakeOut { id: String },
    /// Deregister (if registered), then send Drain once the load balancer
    /// sends no new connections.
    Deregister { id: String, registered: bool },
    /// The engine is drained: wait for its target to show unused.
    AwaitUnused {
        id: String,
        registered: bool,
        waiting_for: Duration,
    },
    /// End the instance. `take_out` deregisters its target first (a Lost
    /// minion never went through a drain).
    Finish {
        id: String,
        finish: Finish,
        decrement: bool,
        take_out: bool,
    },
    /// Record a heartbeat for the terminating hook holding the instance.
    Heartbeat { id: String },
    /// Complete the launching hook's action with CONTINUE.
    CompleteLaunch { id: String },
    /// Protect (or unprotect) instances from the group's own scale-ins.
    Protect {
        instances: Vec<String>,
        protected: bool,
    },
    /// Ask the minion's engine to close `count` of its connections at
    /// message boundaries, so their senders reconnect onto minions below
    /// their share ([`crate::rebalance`]).
    Shed {
        id: String,
        count: u64,
        /// Why, for the event log.
        reason: String,
    },
}

impl Action {
    /// The minion the action is about, if one.
    pub fn minion(&self) -> Option<&str> {
        match self {
            Action::Register { id }
            | Action::TakeOut { id }
            | Action::Deregister { id, .. }
            | Action::AwaitUnused { id, .. }
            | Action::Finish { id, .. }
            | Action::Heartbeat { id }
            | Action::CompleteLaunch { id }
            | Action::Shed { id, .. } => Some(id),
            Action::Protect { .. } => None,
        }
    }
}

/// What one pass changes and calls.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Applied first, in order.
    pub changes: Vec<Change>,
    /// Then made, in order, against the minions as changed.
    pub actions: Vec<Action>,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Gone { id } => write!(f, "{id}: instance gone"),
            Change::Lost { id, silent_for } => write!(f, "{id}: lost after {silent_for:?}"),
            Change::Drain { id, reason, .. } => write!(f, "{id}: drain ({reason})"),
            Change::NoDecrement { id } => write!(f, "{id}: no decrement"),
            Change::Overdue { id } => write!(f, "{id}: drain overdue"),
            Change::RetryTerminate { id } => write!(f, "{id}: terminate again"),
        }
    }
}

/// The pass for one fleet. Pure: the same inputs give the same plan.
pub fn plan(minions: &[MinionSnapshot], cloud: &CloudView, limits: &Limits) -> Plan {
    let mut p = Plan::default();
    let hooked = |m: &MinionSnapshot| {
        cloud
            .hooks
            .as_ref()
            .is_some_and(|h| h.terminating_wait.contains(&m.instance))
    };
    let held_at_launch = |m: &MinionSnapshot| {
        cloud
            .hooks
            .as_ref()
            .is_some_and(|h| h.pending_wait.contains(&m.instance))
    };
    // First what happened to each minion: gone, lost, timed out, taken by
    // the group's terminating hook. `after` is each minion as changed.
    let mut after: Vec<MinionSnapshot> = Vec::with_capacity(minions.len());
    for m in minions {
        let mut m = m.clone();
        if m.state == MinionState::Gone {
            after.push(m);
            continue;
        }
        if hooked(&m) {
            match m.state {
                MinionState::Pending
                | MinionState::Joining
                | MinionState::Ready
                | MinionState::InService
                | MinionState::Unhealthy => {
                    p.changes.push(Change::Drain {
                        id: m.id.to_string(),
                        decrement: false,
                        reason: format!(
                            "the group is terminating {} (terminating lifecycle hook)",
                            m.instance
                        ),
                    });
                    m.state = MinionState::DRAINING;
                    m.in_state_for = Duration::ZERO;
                    m.drain.get_or_insert(DrainIntent {
                        decrement: false,
                        overdue_reported: false,
                    });
                }
                MinionState::Draining(_) | MinionState::Drained | MinionState::Lost => {
                    if let Some(d) = m.drain.as_mut().filter(|d| d.decrement) {
                        d.decrement = false;
                        p.changes.push(Change::NoDecrement {
                            id: m.id.to_string(),
                        });
                    }
                }
                MinionState::Terminating | MinionState::Gone => {}
            }
        }
        if !cloud.instances.contains_key(&m.instance) {
            p.changes.push(Change::Gone {
                id: m.id.to_string(),
            });
            m.state = MinionState::Gone;
            after.push(m);
            continue;
        }
        if m.state.expects_reports() && m.silent_for > limits.lost_timeout {
            p.changes.push(Change::Lost {
                id: m.id.to_string(),
                silent_for: m.silent_for,
            });
            m.state = MinionState::Lost;
        } else {
            let timed_out = match m.state {
                MinionState::Pending if m.silent_for > limits.join_timeout => Some(format!(
                    "never joined within {:?}; replacing it",
                    limits.join_timeout
                )),
                MinionState::Joining if m.in_state_for > limits.join_timeout => Some(format!(
                    "engine never turned healthy within {:?}; replacing it",
                    limits.join_timeout
                )),
                MinionState::Unhealthy if m.in_state_for > limits.unhealthy_timeout => {
                    Some(format!(
                        "engine unhealthy for {:?}; replacing it",
                        limits.unhealthy_timeout
                    ))
                }
                _ => None,
            };
            if let Some(reason) = timed_out {
                p.changes.push(Change::Drain {
                    id: m.id.to_string(),
                    decrement: false,
                    reason,
                });
                m.state = MinionState::DRAINING;
                m.in_state_for = Duration::ZERO;
                m.drain.get_or_insert(DrainIntent {
                    decrement: false,
                    overdue_reported: false,
                });
            }
        }
        after.push(m);
    }

    // Then the calls each minion's state needs.
    for m in &after {
        let hooked = hooked(m);
        let held_at_launch = held_at_launch(m);
        if hooked
            && matches!(
                m.state,
                MinionState::Draining(_) | MinionState::Drained | MinionState::Lost
            )
            && !m.termination_completed
            && m.since_heartbeat
                .is_none_or(|d| d >= limits.heartbeat_every)
        {
            p.actions.push(Action::Heartbeat {
                id: m.id.to_string(),
            });
        }
        if held_at_launch
            && matches!(m.state, MinionState::Ready | MinionState::InService)
            && !m.launch_completed
        {
            p.actions.push(Action::CompleteLaunch {
                id: m.id.to_string(),
            });
        }
        let decrement = m.drain.is_some_and(|d| d.decrement);
        match m.state {
            MinionState::Ready if m.joined => p.actions.push(Action::Register {
                id: m.id.to_string(),
            }),
            // A restarted controller registers again what it found in
            // service (idempotent; a local load balancer starts empty).
            MinionState::InService if m.verify_registration && m.joined => {
                p.actions.push(Action::Register {
                    id: m.id.to_string(),
                })
            }
            MinionState::Unhealthy if m.registered => p.actions.push(Action::TakeOut {
                id: m.id.to_string(),
            }),
            MinionState::Draining(DrainPhase::Deregistering) => {
                p.actions.push(Action::Deregister {
                    id: m.id.to_string(),
                    registered: m.registered,
                })
            }
            MinionState::Draining(DrainPhase::Flushing) => {
                if let Some(d) = m.drain
                    && !d.overdue_reported
                    && m.in_state_for > limits.drain_deadline
                {
                    p.changes.push(Change::Overdue {
                        id: m.id.to_string(),
                    });
                }
            }
            MinionState::Draining(DrainPhase::AwaitingUnused) => {
                p.actions.push(Action::AwaitUnused {
                    id: m.id.to_string(),
                    registered: m.registered,
                    waiting_for: m.in_state_for,
                })
            }
            MinionState::Drained | MinionState::Lost => {
                let finish = if cloud.hooks.is_none() {
                    Finish::Terminate
                } else if hooked {
                    Finish::ContinueTermination
                } else if !m.joined && !decrement && held_at_launch {
                    Finish::AbandonLaunch
                } else if (!m.joined || m.state == MinionState::Lost) && !decrement {
                    // Never joined, or went silent: report it unhealthy and
                    // let the group replace it (DESIGN.md, Lost).
                    Finish::MarkUnhealthy
                } else {
                    Finish::Terminate
                };
                p.actions.push(Action::Finish {
                    id: m.id.to_string(),
                    finish,
                    decrement: decrement && finish == Finish::Terminate,
                    // A Drained minion's target is already unused.
                    take_out: m.state == MinionState::Lost && m.registered,
                });
            }
            // The controller's own terminate put the instance in
            // Terminating:Wait: it is drained, so complete at once.
            MinionState::Terminating if hooked && !m.termination_completed => {
                p.actions.push(Action::Finish {
                    id: m.id.to_string(),
                    finish: Finish::ContinueTermination,
                    decrement: false,
                    take_out: false,
                })
            }
            // The terminate did not take (a controller stopped between its
            // intent and the call, or the call was lost): ask again. The
            // shell's decrement ledger keeps it to one decrement.
            MinionState::Terminating
                if !hooked
                    && cloud
                        .instances
                        .get(&m.instance)
                        .is_some_and(|l| *l != Listed::Terminating)
                    && m.in_state_for > limits.terminate_retry_after =>
            {
                p.changes.push(Change::RetryTerminate {
                    id: m.id.to_string(),
                });
                p.actions.push(Action::Finish {
                    id: m.id.to_string(),
                    finish: Finish::Terminate,
                    decrement,
                    take_out: false,
                });
            }
            _ => {}
        }
    }
    if let Some(hooks) = &cloud.hooks {
        p.actions.extend(protection(&after, hooks, limits));
    }
    if let Some(rebalance) = &limits.rebalance {
        p.actions.extend(spread(&after, rebalance));
    }
    p
}

/// Connections to shed this pass: among in-service minions, and only while
/// no minion is draining (a drain already moves connections, and the
/// planner would count them twice).
fn spread(minions: &[MinionSnapshot], limits: &RebalanceLimits) -> Vec<Action> {
    if minions
        .iter()
        .any(|m| matches!(m.state, MinionState::Draining(_)))
    {
        return Vec::new();
    }
    let holders: Vec<Holder> = minions
        .iter()
        .filter(|m| m.state == MinionState::InService)
        .map(|m| Holder {
            id: &m.id,
            connections: m.connections,
            can_shed: m.can_shed,
            since_shed: m.since_shed,
        })
        .collect();
    rebalance(&holders, limits)
        .into_iter()
        .map(|s| Action::Shed {
            reason: format!(
                "holds {} connections, fair share {} over {} in-service minions",
                s.connections, s.share, s.holders
            ),
            id: s.id,
            count: s.count,
        })
        .collect()
}

/// Scale-in protection changes (AWS): minions in service that had work
/// within `protect_after_work` are protected, the others not; only
/// instances in service in the group, and only where protection differs.
fn protection(minions: &[MinionSnapshot], hooks: &HookView, limits: &Limits) -> Vec<Action> {
    let mut protect = Vec::new();
    let mut unprotect = Vec::new();
    for m in minions {
        if !hooks.in_service.contains(&m.instance) {
            continue;
        }
        let busy = matches!(m.state, MinionState::Ready | MinionState::InService)
            && m.since_busy.is_some_and(|d| d < limits.protect_after_work);
        match (busy, hooks.protected.contains(&m.instance)) {
            (true, false) => protect.push(m.instance.to_string()),
            (false, true) => unprotect.push(m.instance.to_string()),
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

/// The fleet's capacity: minions that count against the desired size.
/// Draining, drained, unhealthy and lost ones never do.
pub fn capacity(minions: &[MinionSnapshot]) -> u32 {
    let n = minions
        .iter()
        .filter(|m| m.state.counts_as_capacity())
        .count();
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Minions whose termination will lower the group's desired capacity: the
/// group's desired count includes them until then.
pub fn pending_decrements(minions: &[MinionSnapshot]) -> u32 {
    let n = minions
        .iter()
        .filter(|m| {
            matches!(
                m.state,
                MinionState::Draining(_) | MinionState::Drained | MinionState::Lost
            ) && m.drain.is_some_and(|d| d.decrement)
        })
        .count();
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The group as the scaling step needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupSize {
    pub desired: u32,
    pub max: u32,
}

/// What an applied decision does to the fleet.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scaling {
    /// Minions to drain, with decrement.
    pub victims: Vec<String>,
    /// The group's desired capacity to set, when it must grow.
    pub grow_to: Option<u32>,
    /// The group's own max kept the fleet below what it wants.
    pub clipped_by_group_max: Option<u32>,
}

/// Turns an applied decision for `desired` minions into victims (scale-in:
/// the least loaded, never below `desired`) and the group's new desired
/// capacity (scale-out: `desired` plus the decrements still to come, within
/// the group's max). Never lowers the group's desired capacity itself: a
/// scale-in lowers it one terminate at a time.
pub fn scale(minions: &[MinionSnapshot], desired: u32, group: Option<GroupSize>) -> Scaling {
    let mut s = Scaling::default();
    let capacity = capacity(minions);
    if capacity > desired {
        let candidates: Vec<Candidate<String>> = minions
            .iter()
            .map(|m| Candidate {
                id: m.id.to_string(),
                state: m.state,
                load: m.load,
            })
            .collect();
        s.victims = pick_victims(&candidates, (capacity - desired) as usize);
    }
    let Some(group) = group else {
        return s;
    };
    let want = desired.saturating_add(pending_decrements(minions));
    if want > group.desired {
        let clipped = want.min(group.max);
        if clipped < want {
            s.clipped_by_group_max = Some(want);
        }
        s.grow_to = (clipped > group.desired).then_some(clipped);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: Duration = Duration::from_secs(1);

    fn limits() -> Limits {
        Limits {
            lost_timeout: 10 * S,
            join_timeout: 60 * S,
            unhealthy_timeout: 300 * S,
            drain_deadline: 120 * S,
            heartbeat_every: 30 * S,
            terminate_retry_after: 30 * S,
            protect_after_work: 60 * S,
            rebalance: Some(crate::rebalance::DEFAULT_REBALANCE),
        }
    }

    fn minion(id: &str, state: MinionState) -> MinionSnapshot<'static> {
        MinionSnapshot {
            id: id.to_owned().into(),
            instance: format!("i-{id}").into(),
            state,
            in_state_for: Duration::ZERO,
            silent_for: Duration::ZERO,
            joined: true,
            registered: matches!(state, MinionState::InService),
            verify_registration: false,
            drain: state.is_leaving().then_some(DrainIntent {
                decrement: true,
                overdue_reported: false,
            }),
            load: Load::default(),
            since_busy: None,
            since_heartbeat: None,
            launch_completed: false,
            termination_completed: false,
            connections: 0,
            can_shed: true,
            since_shed: None,
        }
    }

    fn listing<'a>(minions: &[MinionSnapshot<'a>]) -> CloudView<'a> {
        CloudView {
            instances: minions
                .iter()
                .map(|m| (m.instance.clone(), Listed::InService))
                .collect(),
            hooks: None,
        }
    }

    #[test]
    fn each_drain_phase_asks_for_its_call() {
        let ms = [
            minion("a", MinionState::Draining(DrainPhase::Deregistering)),
            minion("b", MinionState::Draining(DrainPhase::Flushing)),
            minion("c", MinionState::Draining(DrainPhase::AwaitingUnused)),
            minion("d", MinionState::Drained),
            minion("e", MinionState::Ready),
        ];
        let p = plan(&ms, &listing(&ms), &limits());
        assert!(p.changes.is_empty(), "{:?}", p.changes);
        assert_eq!(
            p.actions,
            [
                Action::Deregister {
                    id: "a".into(),
                    registered: false
                },
                Action::AwaitUnused {
                    id: "c".into(),
                    registered: false,
                    waiting_for: Duration::ZERO
                },
                Action::Finish {
                    id: "d".into(),
                    finish: Finish::Terminate,
                    decrement: true,
                    take_out: false
                },
                Action::Register { id: "e".into() },
            ]
        );
    }

    #[test]
    fn a_silent_minion_is_lost_and_a_vanished_one_gone() {
        let mut quiet = minion("a", MinionState::InService);
        quiet.silent_for = 11 * S;
        let vanished = minion("b", MinionState::InService);
        let ms = [quiet, vanished];
        let mut cloud = listing(&ms);
        cloud.instances.remove("i-b");
        let p = plan(&ms, &cloud, &limits());
        assert_eq!(
            p.changes,
            [
                Change::Lost {
                    id: "a".into(),
                    silent_for: 11 * S
                },
                Change::Gone { id: "b".into() },
            ]
        );
        // Lost with no drain on record: terminated to be replaced, and its
        // target taken out first.
        assert_eq!(
            p.actions,
            [Action::Finish {
                id: "a".into(),
                finish: Finish::Terminate,
                decrement: false,
                take_out: true
            }]
        );
    }

    #[test]
    fn a_minion_that_never_turns_healthy_is_replaced_without_decrement() {
        let mut joining = minion("a", MinionState::Joining);
        joining.in_state_for = 61 * S;
        let ms = [joining];
        let p = plan(&ms, &listing(&ms), &limits());
        assert!(
            matches!(
                &p.changes[..],
                [Change::Drain {
                    decrement: false,
                    ..
                }]
            ),
            "{:?}",
            p.changes
        );
        assert!(matches!(&p.actions[..], [Action::Deregister { .. }]));
    }

    #[test]
    fn the_terminating_hook_takes_a_scale_in_victims_decrement() {
        let victim = minion("a", MinionState::Drained);
        let ms = [victim];
        let mut cloud = listing(&ms);
        cloud.hooks = Some(HookView {
            terminating_wait: [Cow::from("i-a")].into(),
            ..Default::default()
        });
        let p = plan(&ms, &cloud, &limits());
        assert_eq!(p.changes, [Change::NoDecrement { id: "a".into() }]);
        assert_eq!(
            p.actions,
            [
                Action::Heartbeat { id: "a".into() },
                Action::Finish {
                    id: "a".into(),
                    finish: Finish::ContinueTermination,
                    decrement: false,
                    take_out: false
                }
            ]
        );
    }

    #[test]
    fn a_terminate_that_did_not_take_is_asked_again_after_a_while() {
        let mut t = minion("a", MinionState::Terminating);
        t.in_state_for = 10 * S;
        let ms = [t.clone()];
        assert!(plan(&ms, &listing(&ms), &limits()).actions.is_empty());
        t.in_state_for = 31 * S;
        let ms = [t];
        let p = plan(&ms, &listing(&ms), &limits());
        assert_eq!(p.changes, [Change::RetryTerminate { id: "a".into() }]);
        assert!(matches!(
            &p.actions[..],
            [Action::Finish {
                decrement: true,
                ..
            }]
        ));
    }

    #[test]
    fn a_new_minion_gets_connections_shed_onto_it_unless_a_drain_moves_them() {
        let mut old = minion("a", MinionState::InService);
        old.connections = 16;
        let new = minion("b", MinionState::InService);
        let fleet = [old.clone(), new.clone()];
        let p = plan(&fleet, &listing(&fleet), &limits());
        assert_eq!(
            p.actions,
            [Action::Shed {
                id: "a".to_owned(),
                count: 8,
                reason: "holds 16 connections, fair share 8 over 2 in-service minions".to_owned(),
            }]
        );
        // Still booting, draining, or with rebalancing off: nothing.
        let booting = [old.clone(), minion("b", MinionState::Ready)];
        let p = plan(&booting, &listing(&booting), &limits());
        assert!(
            !p.actions.iter().any(|a| matches!(a, Action::Shed { .. })),
            "{p:?}"
        );
        let draining = [
            old.clone(),
            new.clone(),
            minion("c", MinionState::Draining(DrainPhase::Flushing)),
        ];
        let p = plan(&draining, &listing(&draining), &limits());
        assert!(
            !p.actions.iter().any(|a| matches!(a, Action::Shed { .. })),
            "{p:?}"
        );
        let off = Limits {
            rebalance: None,
            ..limits()
        };
        assert_eq!(plan(&fleet, &listing(&fleet), &off).actions, []);
    }

    #[test]
    fn scaling_in_picks_victims_and_never_lowers_the_group() {
        let mut ms: Vec<MinionSnapshot> = ["a", "b", "c"]
            .iter()
            .map(|id| minion(id, MinionState::InService))
            .collect();
        ms[0].load.queue_depth = 9;
        let s = scale(&ms, 1, Some(GroupSize { desired: 3, max: 5 }));
        assert_eq!(s.victims, ["b", "c"]);
        assert_eq!(s.grow_to, None);
        ms[1].state = MinionState::DRAINING;
        ms[1].drain = Some(DrainIntent {
            decrement: true,
            overdue_reported: false,
        });
        // Three wanted while one drains with decrement: the group holds 4.
        let s = scale(&ms, 3, Some(GroupSize { desired: 3, max: 5 }));
        assert_eq!(s.grow_to, Some(4));
        let s = scale(&ms, 9, Some(GroupSize { desired: 3, max: 5 }));
        assert_eq!((s.grow_to, s.clipped_by_group_max), (Some(5), Some(10)));
    }

    fn any_state() -> impl Strategy<Value = MinionState> {
        proptest::sample::select(MinionState::ALL.to_vec())
    }

    prop_compose! {
        fn any_minion(k: usize)(
            state in any_state(),
            in_state in 0u64..400,
            silent in 0u64..100,
            joined in any::<bool>(),
            registered in any::<bool>(),
            verify in any::<bool>(),
            drain in proptest::option::of((any::<bool>(), any::<bool>())),
            queue in 0u64..20,
            busy in proptest::option::of(0u64..120),
            heartbeat in proptest::option::of(0u64..60),
            launch_completed in any::<bool>(),
            termination_completed in any::<bool>(),
            connections in 0u64..40,
            can_shed in any::<bool>(),
            shed in proptest::option::of(0u64..10),
        ) -> MinionSnapshot<'static> {
            MinionSnapshot {
                id: format!("m-{k}").into(),
                instance: format!("i-{k}").into(),
                state,
                in_state_for: Duration::from_secs(in_state),
                silent_for: Duration::from_secs(silent),
                joined,
                registered,
                verify_registration: verify,
                drain: drain.map(|(decrement, overdue_reported)| DrainIntent { decrement, overdue_reported }),
                load: Load { queue_depth: queue, in_flight: 0 },
                since_busy: busy.map(Duration::from_secs),
                since_heartbeat: heartbeat.map(Duration::from_secs),
                launch_completed,
                termination_completed,
                connections,
                can_shed,
                since_shed: shed.map(Duration::from_secs),
            }
        }
    }

    fn any_fleet() -> impl Strategy<Value = (Vec<MinionSnapshot<'static>>, CloudView<'static>)> {
        (0usize..8)
            .prop_flat_map(|n| {
                let minions: Vec<_> = (0..n).map(any_minion).collect();
                (
                    minions,
                    proptest::collection::vec(
                        proptest::sample::select(vec![
                            None,
                            Some(Listed::Pending),
                            Some(Listed::InService),
                            Some(Listed::Terminating),
                        ]),
                        n,
                    ),
                    any::<bool>(),
                    proptest::collection::vec(0u8..4, n),
                )
            })
            .prop_map(|(minions, listed, aws, hooks)| {
                let mut cloud = CloudView::default();
                let mut view = HookView::default();
                for ((m, l), h) in minions.iter().zip(listed).zip(hooks) {
                    if let Some(l) = l {
                        cloud.instances.insert(m.instance.clone(), l);
                    }
                    match h {
                        1 => view.pending_wait.insert(m.instance.clone()),
                        2 => view.terminating_wait.insert(m.instance.clone()),
                        3 => view.protected.insert(m.instance.clone()),
                        _ => false,
                    };
                    view.in_service.insert(m.instance.clone());
                }
                if aws {
                    cloud.hooks = Some(view);
                }
                (minions, cloud)
            })
    }

    proptest! {
        #[test]
        fn the_plan_keeps_the_invariants((minions, cloud) in any_fleet()) {
            let p = plan(&minions, &cloud, &limits());
            let before = |id: &str| minions.iter().find(|m| m.id == id).expect("known");
            for a in &p.actions {
                match a {
                    Action::Finish { id, decrement, .. } => {
                        let m = before(id);
                        let lost_now = p.changes.contains(&Change::Lost { id: id.clone(), silent_for: m.silent_for });
                        prop_assert!(
                            matches!(m.state, MinionState::Drained | MinionState::Lost | MinionState::Terminating) || lost_now,
                            "terminated a {} minion", m.state
                        );
                        if *decrement {
                            prop_assert!(m.drain.is_some_and(|d| d.decrement), "decrement without a drain that asked for one");
                            prop_assert!(
                                !cloud.hooks.as_ref().is_some_and(|h| h.terminating_wait.contains(&m.instance)),
                                "decrement for an instance the group terminates itself"
                            );
                        }
                    }
                    Action::Register { id } => {
                        let m = before(id);
                        prop_assert!(!m.state.is_leaving(), "registered a {} minion", m.state);
                        let chosen = p.changes.iter().any(|c| matches!(c, Change::Drain { id: d, .. } | Change::Lost { id: d, .. } | Change::Gone { id: d } if d == id));
                        prop_assert!(!chosen, "registered a minion this pass took out of service");
                    }
                    Action::Shed { id, count, .. } => {
                        let m = before(id);
                        prop_assert!(m.state == MinionState::InService && m.can_shed, "asked a {} minion to shed", m.state);
                        prop_assert!(*count > 0 && *count <= m.connections);
                        let chosen = p.changes.iter().any(|c| matches!(c, Change::Drain { id: d, .. } | Change::Lost { id: d, .. } | Change::Gone { id: d } if d == id));
                        prop_assert!(!chosen, "asked a minion this pass took out of service to shed");
                        let draining = minions.iter().any(|m| matches!(m.state, MinionState::Draining(_)))
                            || p.changes.iter().any(|c| matches!(c, Change::Drain { .. }));
                        prop_assert!(!draining, "shed while a drain moves connections");
                    }
                    _ => {}
                }
            }
            // At most one call that ends each instance per pass.
            let mut ended = BTreeSet::new();
            for a in &p.actions {
                if let Action::Finish { id, .. } = a {
                    prop_assert!(ended.insert(id.clone()), "{id} ended twice in one pass");
                }
            }
        }

        #[test]
        fn capacity_never_counts_a_minion_on_its_way_out((minions, _) in any_fleet()) {
            let n = capacity(&minions);
            let counted = minions.iter().filter(|m| !m.state.is_leaving() && m.state != MinionState::Unhealthy && m.state != MinionState::Gone).count();
            prop_assert_eq!(n as usize, counted);
        }

        #[test]
        fn scaling_stays_within_the_group_and_keeps_desired(
            (minions, _) in any_fleet(),
            desired in 0u32..10,
            group_desired in 0u32..10,
            group_max in 0u32..12,
        ) {
            let group = GroupSize { desired: group_desired, max: group_max };
            let s = scale(&minions, desired, Some(group));
            if let Some(n) = s.grow_to {
                prop_assert!(n <= group_max && n > group_desired);
            }
            let cap = capacity(&minions);
            prop_assert_eq!(s.victims.len() as u32, cap.saturating_sub(desired));
            for v in &s.victims {
                let m = minions.iter().find(|m| &m.id == v).expect("known");
                prop_assert!(m.state.counts_as_capacity(), "victim {} is {}", v, m.state);
            }
        }
    }

    /// A model of the shell around the planner: each plan's changes go
    /// through `step`, its calls to a scripted group, with the decrement
    /// ledger the shell keeps in its store. Ops: a pass whose calls answer
    /// (0), whose terminate answers are lost after being applied (1) or lost
    /// before (2); engines finish flushing (3); time passes (4); the
    /// controller restarts (5); the group's listing catches up with the
    /// terminations it applied (6).
    fn run_model(
        n: usize,
        victims: usize,
        ops: &[u8],
    ) -> (BTreeMap<String, u32>, Vec<MinionSnapshot<'static>>) {
        use crate::lifecycle::{LifecycleEvent as E, step};
        let mut minions: Vec<MinionSnapshot> = (0..n)
            .map(|k| {
                let mut m = minion(&k.to_string(), MinionState::InService);
                m.drain = None;
                if k < victims {
                    m.state = MinionState::DRAINING;
                    m.drain = Some(DrainIntent {
                        decrement: true,
                        overdue_reported: false,
                    });
                }
                m
            })
            .collect();
        let mut cloud = listing(&minions);
        let mut ledger = BTreeSet::new();
        let mut applied = BTreeSet::new();
        let mut decrements: BTreeMap<String, u32> = BTreeMap::new();
        let event = |m: &mut MinionSnapshot, e: E| {
            if let Ok(next) = step(m.state, e)
                && next != m.state
            {
                m.state = next;
                m.in_state_for = Duration::ZERO;
            }
        };
        for &op in ops {
            match op {
                0..=2 => {
                    let p = plan(&minions, &cloud, &limits());
                    for c in p.changes {
                        let (id, e) = match &c {
                            Change::Gone { id } => (id, Some(E::InstanceGone)),
                            Change::Lost { id, .. } => (id, Some(E::ReportsMissed)),
                            Change::Drain { id, .. } => (id, Some(E::DrainChosen)),
                            Change::NoDecrement { id }
                            | Change::Overdue { id }
                            | Change::RetryTerminate { id } => (id, None),
                        };
                        let m = minions.iter_mut().find(|m| &m.id == id).expect("known");
                        match c {
                            Change::Drain { decrement, .. } => {
                                m.drain.get_or_insert(DrainIntent {
                                    decrement,
                                    overdue_reported: false,
                                });
                            }
                            Change::RetryTerminate { .. } => m.in_state_for = Duration::ZERO,
                            _ => {}
                        }
                        if let Some(e) = e {
                            event(m, e);
                        }
                    }
                    for a in p.actions {
                        let Some(id) = a.minion().map(str::to_owned) else {
                            continue;
                        };
                        let m = minions.iter_mut().find(|m| m.id == id).expect("known");
                        match a {
                            Action::Deregister { .. } => {
                                m.registered = false;
                                event(m, E::DrainSent);
                            }
                            Action::AwaitUnused { .. } => event(m, E::TargetUnused),
                            Action::Finish { decrement, .. } => {
                                let claimed = decrement && ledger.insert(m.instance.clone());
                                // The group applies the call; its listing
                                // catches up only later (op 6), as AWS's
                                // eventually consistent describe does, so a
                                // repeated call with decrement would count.
                                if op != 2 && cloud.instances.contains_key(&m.instance) {
                                    applied.insert(m.instance.clone());
                                    if claimed {
                                        *decrements.entry(m.instance.to_string()).or_default() += 1;
                                    }
                                }
                                if op == 0 {
                                    event(m, E::TerminateIssued);
                                }
                            }
                            _ => {}
                        }
                    }
                }
                3 => {
                    for m in &mut minions {
                        if m.state == MinionState::Draining(DrainPhase::Flushing) {
                            event(m, E::Drained);
                        }
                    }
                }
                4 => {
                    for m in &mut minions {
                        m.in_state_for += 40 * S;
                    }
                }
                5 => {
                    for m in &mut minions {
                        m.silent_for = Duration::ZERO;
                        m.verify_registration = m.state == MinionState::InService && m.registered;
                    }
                }
                _ => cloud.instances.retain(|i, _| !applied.contains(i)),
            }
        }
        (decrements, minions)
    }

    proptest! {
        #[test]
        fn at_most_one_decrement_per_instance_across_passes_and_restarts(
            n in 1usize..5,
            victims in 0usize..5,
            ops in proptest::collection::vec(0u8..7, 1..80),
        ) {
            let victims = victims.min(n);
            let (decrements, _) = run_model(n, victims, &ops);
            for (instance, count) in &decrements {
                prop_assert!(*count <= 1, "{instance} decremented {count} times");
                let k: usize = instance.trim_start_matches("i-").parse().expect("index");
                prop_assert!(k < victims, "{instance} was not chosen for scale-in");
            }
        }
    }

    #[test]
    fn the_model_scales_in_when_nothing_fails() {
        // Pass, flush, pass, pass, group ends it, pass: the victim is gone
        // with its one decrement; the other minion stays.
        let (decrements, minions) = run_model(2, 1, &[0, 3, 0, 0, 6, 0]);
        assert_eq!(decrements, BTreeMap::from([("i-0".to_owned(), 1)]));
        assert_eq!(minions[0].state, MinionState::Gone);
        assert_eq!(minions[1].state, MinionState::InService);
    }
}
