//! The minion lifecycle, as the controller sees it (DESIGN.md, "The minion
//! lifecycle"). [`step`] is the whole state machine: every change of a
//! minion's state, drain phases included, goes through it, and anything it
//! refuses is a bug or a message out of order, never a silent change.

use std::fmt;

/// Where a drain is. The phases are states of the one machine (a
/// [`MinionState::Draining`] carries its phase), not flags beside it, so a
/// controller that restarts resumes a drain at its phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DrainPhase {
    /// Out of the load balancer: waiting until it sends no new connections.
    Deregistering,
    /// Drain sent: the engine closes its connections at message boundaries
    /// and empties its queue.
    Flushing,
    /// The engine reported drained; waiting for the target to show unused.
    AwaitingUnused,
}

impl DrainPhase {
    pub const ALL: [DrainPhase; 3] = [
        DrainPhase::Deregistering,
        DrainPhase::Flushing,
        DrainPhase::AwaitingUnused,
    ];
}

/// Where a minion is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MinionState {
    /// The cloud reports the instance; no agent has joined yet.
    Pending,
    /// The agent joined (identity proven); its engine is warming up.
    Joining,
    /// The engine reports healthy; the controller is registering it in the
    /// load balancer.
    Ready,
    /// Registered in the load balancer and taking work.
    InService,
    /// The engine reports unhealthy: out of the load balancer and not
    /// capacity until it is healthy again (then Ready), or retired when it
    /// stays unhealthy too long.
    Unhealthy,
    /// Chosen for removal, in one of its phases. Never counts as capacity.
    Draining(DrainPhase),
    /// Nothing queued, in flight or connected, target unused: safe to
    /// terminate.
    Drained,
    /// Terminate issued; waiting for the cloud to confirm.
    Terminating,
    /// The instance no longer exists. Final.
    Gone,
    /// No report within the lost timeout; to be terminated and replaced.
    Lost,
}

impl MinionState {
    pub const ALL: [MinionState; 12] = [
        MinionState::Pending,
        MinionState::Joining,
        MinionState::Ready,
        MinionState::InService,
        MinionState::Unhealthy,
        MinionState::Draining(DrainPhase::Deregistering),
        MinionState::Draining(DrainPhase::Flushing),
        MinionState::Draining(DrainPhase::AwaitingUnused),
        MinionState::Drained,
        MinionState::Terminating,
        MinionState::Gone,
        MinionState::Lost,
    ];

    /// The first phase of every drain.
    pub const DRAINING: MinionState = MinionState::Draining(DrainPhase::Deregistering);

    /// Minions in these states are the fleet's capacity: what the policy
    /// counts against its desired size. Draining and unhealthy ones never
    /// count.
    pub fn counts_as_capacity(self) -> bool {
        matches!(
            self,
            MinionState::Pending
                | MinionState::Joining
                | MinionState::Ready
                | MinionState::InService
        )
    }

    /// States in which the minion's agent is expected to report.
    pub fn expects_reports(self) -> bool {
        matches!(
            self,
            MinionState::Joining
                | MinionState::Ready
                | MinionState::InService
                | MinionState::Unhealthy
                | MinionState::Draining(_)
        )
    }

    pub fn is_draining(self) -> bool {
        matches!(self, MinionState::Draining(_))
    }

    /// On its way out: chosen for removal and not yet gone.
    pub fn is_leaving(self) -> bool {
        matches!(
            self,
            MinionState::Draining(_)
                | MinionState::Drained
                | MinionState::Terminating
                | MinionState::Lost
        )
    }

    /// The state's name, as shown to operators and kept in the store:
    /// drain phases read `Draining/Flushing`.
    pub fn as_str(self) -> &'static str {
        match self {
            MinionState::Pending => "Pending",
            MinionState::Joining => "Joining",
            MinionState::Ready => "Ready",
            MinionState::InService => "InService",
            MinionState::Unhealthy => "Unhealthy",
            MinionState::Draining(DrainPhase::Deregistering) => "Draining/Deregistering",
            MinionState::Draining(DrainPhase::Flushing) => "Draining/Flushing",
            MinionState::Draining(DrainPhase::AwaitingUnused) => "Draining/AwaitingUnused",
            MinionState::Drained => "Drained",
            MinionState::Terminating => "Terminating",
            MinionState::Gone => "Gone",
            MinionState::Lost => "Lost",
        }
    }

    /// The inverse of [`MinionState::as_str`].
    pub fn parse(s: &str) -> Option<MinionState> {
        MinionState::ALL.into_iter().find(|m| m.as_str() == s)
    }
}

impl fmt::Display for MinionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something that happened to a minion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LifecycleEvent {
    /// The agent joined, or joined again after a reconnect.
    Joined,
    /// The agent reported a healthy engine.
    EngineHealthy,
    /// The agent reported an unhealthy engine.
    EngineUnhealthy,
    /// The controller registered the minion's engine in the load balancer.
    Registered,
    /// The controller or an operator chose the minion for removal.
    DrainChosen,
    /// The agent reports its engine draining although no drain is on record
    /// (a controller that lost its memory, an operator's own stop): adopt it
    /// as a drain, never register it again.
    DrainReported,
    /// The load balancer sends the target no new connections and the Drain
    /// command went out.
    DrainSent,
    /// The agent reported its engine drained, after the Drain command.
    Drained,
    /// The load balancer shows the target unused (or is done with it).
    TargetUnused,
    /// The controller issued the terminate call.
    TerminateIssued,
    /// The cloud no longer lists the instance.
    InstanceGone,
    /// No report arrived within the lost timeout.
    ReportsMissed,
}

impl LifecycleEvent {
    pub const ALL: [LifecycleEvent; 12] = [
        LifecycleEvent::Joined,
        LifecycleEvent::EngineHealthy,
        LifecycleEvent::EngineUnhealthy,
        LifecycleEvent::Registered,
        LifecycleEvent::DrainChosen,
        LifecycleEvent::DrainReported,
        LifecycleEvent::DrainSent,
        LifecycleEvent::Drained,
        LifecycleEvent::TargetUnused,
        LifecycleEvent::TerminateIssued,
        LifecycleEvent::InstanceGone,
        LifecycleEvent::ReportsMissed,
    ];
}

impl fmt::Display for LifecycleEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            LifecycleEvent::Joined => "joined",
            LifecycleEvent::EngineHealthy => "engine healthy",
            LifecycleEvent::EngineUnhealthy => "engine unhealthy",
            LifecycleEvent::Registered => "registered in the load balancer",
            LifecycleEvent::DrainChosen => "chosen for drain",
            LifecycleEvent::DrainReported => "reported draining",
            LifecycleEvent::DrainSent => "drain sent",
            LifecycleEvent::Drained => "drained",
            LifecycleEvent::TargetUnused => "target unused",
            LifecycleEvent::TerminateIssued => "terminate issued",
            LifecycleEvent::InstanceGone => "instance gone",
            LifecycleEvent::ReportsMissed => "reports missed",
        };
        f.write_str(s)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a {state} minion cannot take event '{event}'")]
pub struct InvalidTransition {
    pub state: MinionState,
    pub event: LifecycleEvent,
}

/// The state machine. Returns the next state, which may equal `state` for
/// events that are idempotent there (a re-join of a minion in service).
pub fn step(state: MinionState, event: LifecycleEvent) -> Result<MinionState, InvalidTransition> {
    use DrainPhase as P;
    use LifecycleEvent as E;
    use MinionState as S;
    let next = match (state, event) {
        (S::Pending, E::Joined) => S::Joining,
        // A reconnecting agent joins again; its state does not change.
        (
            S::Joining | S::Ready | S::InService | S::Unhealthy | S::Draining(_) | S::Drained,
            E::Joined,
        ) => state,

        (S::Joining | S::Unhealthy, E::EngineHealthy) => S::Ready,
        (S::Ready | S::InService | S::Draining(_) | S::Drained, E::EngineHealthy) => state,

        (S::Ready | S::InService, E::EngineUnhealthy) => S::Unhealthy,
        // Still warming up, or on the way out: nothing changes.
        (S::Joining | S::Unhealthy | S::Draining(_) | S::Drained, E::EngineUnhealthy) => state,

        (S::Ready, E::Registered) => S::InService,
        (S::InService, E::Registered) => S::InService,

        (S::Pending | S::Joining | S::Ready | S::InService | S::Unhealthy, E::DrainChosen) => {
            S::Draining(P::Deregistering)
        }
        (S::Draining(_), E::DrainChosen) => state,

        // Adopted: it may still be registered, so it starts at the
        // beginning; the Drain it gets again is a no-op for its engine.
        (S::Joining | S::Ready | S::InService | S::Unhealthy, E::DrainReported) => {
            S::Draining(P::Deregistering)
        }
        (S::Draining(_) | S::Drained, E::DrainReported) => state,

        (S::Draining(P::Deregistering), E::DrainSent) => S::Draining(P::Flushing),
        (S::Draining(P::Flushing | P::AwaitingUnused), E::DrainSent) => state,

        (S::Draining(P::Flushing), E::Drained) => S::Draining(P::AwaitingUnused),
        (S::Draining(P::AwaitingUnused) | S::Drained, E::Drained) => state,

        (S::Draining(P::AwaitingUnused), E::TargetUnused) => S::Drained,
        (S::Drained, E::TargetUnused) => S::Drained,

        (S::Drained | S::Lost, E::TerminateIssued) => S::Terminating,
        (S::Terminating, E::TerminateIssued) => S::Terminating,

        // An instance can vanish in any state: terminated by us, replaced by
        // the group, or killed by someone else.
        (_, E::InstanceGone) if state != S::Gone => S::Gone,

        (
            S::Joining | S::Ready | S::InService | S::Unhealthy | S::Draining(_),
            E::ReportsMissed,
        ) => S::Lost,

        _ => return Err(InvalidTransition { state, event }),
    };
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use DrainPhase as P;
    use LifecycleEvent as E;
    use MinionState as S;

    /// Every (state, event) pair and what it must give: the whole table, so a
    /// change to `step` that is not also made here fails.
    fn expected(state: S, event: E) -> Option<S> {
        let dereg = S::Draining(P::Deregistering);
        let flushing = S::Draining(P::Flushing);
        let awaiting = S::Draining(P::AwaitingUnused);
        Some(match (state, event) {
            (S::Pending, E::Joined) => S::Joining,
            (S::Pending, E::DrainChosen) => dereg,
            (S::Pending, E::InstanceGone) => S::Gone,

            (S::Joining, E::Joined) => S::Joining,
            (S::Joining, E::EngineHealthy) => S::Ready,
            (S::Joining, E::EngineUnhealthy) => S::Joining,
            (S::Joining, E::DrainChosen) => dereg,
            (S::Joining, E::DrainReported) => dereg,
            (S::Joining, E::InstanceGone) => S::Gone,
            (S::Joining, E::ReportsMissed) => S::Lost,

            (S::Ready, E::Joined) => S::Ready,
            (S::Ready, E::EngineHealthy) => S::Ready,
            (S::Ready, E::EngineUnhealthy) => S::Unhealthy,
            (S::Ready, E::Registered) => S::InService,
            (S::Ready, E::DrainChosen) => dereg,
            (S::Ready, E::DrainReported) => dereg,
            (S::Ready, E::InstanceGone) => S::Gone,
            (S::Ready, E::ReportsMissed) => S::Lost,

            (S::InService, E::Joined) => S::InService,
            (S::InService, E::EngineHealthy) => S::InService,
            (S::InService, E::EngineUnhealthy) => S::Unhealthy,
            (S::InService, E::Registered) => S::InService,
            (S::InService, E::DrainChosen) => dereg,
            (S::InService, E::DrainReported) => dereg,
            (S::InService, E::InstanceGone) => S::Gone,
            (S::InService, E::ReportsMissed) => S::Lost,

            (S::Unhealthy, E::Joined) => S::Unhealthy,
            (S::Unhealthy, E::EngineHealthy) => S::Ready,
            (S::Unhealthy, E::EngineUnhealthy) => S::Unhealthy,
            (S::Unhealthy, E::DrainChosen) => dereg,
            (S::Unhealthy, E::DrainReported) => dereg,
            (S::Unhealthy, E::InstanceGone) => S::Gone,
            (S::Unhealthy, E::ReportsMissed) => S::Lost,

            (S::Draining(_), E::Joined) => state,
            (S::Draining(_), E::EngineHealthy) => state,
            (S::Draining(_), E::EngineUnhealthy) => state,
            (S::Draining(_), E::DrainChosen) => state,
            (S::Draining(_), E::DrainReported) => state,
            (S::Draining(P::Deregistering), E::DrainSent) => flushing,
            (S::Draining(P::Flushing), E::DrainSent) => flushing,
            (S::Draining(P::AwaitingUnused), E::DrainSent) => awaiting,
            (S::Draining(P::Flushing), E::Drained) => awaiting,
            (S::Draining(P::AwaitingUnused), E::Drained) => awaiting,
            (S::Draining(P::AwaitingUnused), E::TargetUnused) => S::Drained,
            (S::Draining(_), E::InstanceGone) => S::Gone,
            (S::Draining(_), E::ReportsMissed) => S::Lost,

            (S::Drained, E::Joined) => S::Drained,
            (S::Drained, E::EngineHealthy) => S::Drained,
            (S::Drained, E::EngineUnhealthy) => S::Drained,
            (S::Drained, E::DrainReported) => S::Drained,
            (S::Drained, E::Drained) => S::Drained,
            (S::Drained, E::TargetUnused) => S::Drained,
            (S::Drained, E::TerminateIssued) => S::Terminating,
            (S::Drained, E::InstanceGone) => S::Gone,

            (S::Terminating, E::TerminateIssued) => S::Terminating,
            (S::Terminating, E::InstanceGone) => S::Gone,

            (S::Lost, E::TerminateIssued) => S::Terminating,
            (S::Lost, E::InstanceGone) => S::Gone,

            _ => return None,
        })
    }

    #[test]
    fn every_transition_matches_the_table() {
        for state in S::ALL {
            for event in E::ALL {
                let got = step(state, event).ok();
                assert_eq!(got, expected(state, event), "{state} + {event}");
            }
        }
    }

    #[test]
    fn the_happy_path_from_launch_to_gone() {
        let path = [
            (E::Joined, S::Joining),
            (E::EngineHealthy, S::Ready),
            (E::Registered, S::InService),
            (E::DrainChosen, S::Draining(P::Deregistering)),
            (E::DrainSent, S::Draining(P::Flushing)),
            (E::Drained, S::Draining(P::AwaitingUnused)),
            (E::TargetUnused, S::Drained),
            (E::TerminateIssued, S::Terminating),
            (E::InstanceGone, S::Gone),
        ];
        let mut state = S::Pending;
        for (event, want) in path {
            state = step(state, event).expect("valid transition");
            assert_eq!(state, want);
        }
    }

    #[test]
    fn gone_is_final() {
        for event in E::ALL {
            assert!(step(S::Gone, event).is_err(), "Gone + {event}");
        }
    }

    #[test]
    fn no_terminate_before_drained() {
        for state in S::ALL {
            if matches!(state, S::Drained | S::Lost | S::Terminating) {
                continue;
            }
            assert!(
                step(state, E::TerminateIssued).is_err(),
                "{state} must drain first"
            );
        }
    }

    #[test]
    fn a_draining_minion_is_never_registered_again() {
        for state in S::ALL.into_iter().filter(|s| s.is_leaving()) {
            for event in E::ALL {
                if let Ok(next) = step(state, event) {
                    assert!(
                        next.is_leaving() || next == S::Gone,
                        "{state} + {event} -> {next}"
                    );
                }
            }
        }
    }

    #[test]
    fn an_unhealthy_engine_leaves_service_and_comes_back_through_ready() {
        let s = step(S::InService, E::EngineUnhealthy).expect("unhealthy");
        assert_eq!(s, S::Unhealthy);
        assert!(!s.counts_as_capacity());
        assert_eq!(step(s, E::EngineHealthy), Ok(S::Ready));
    }

    #[test]
    fn only_pre_drain_states_count_as_capacity() {
        let capacity: Vec<_> = S::ALL
            .into_iter()
            .filter(|s| s.counts_as_capacity())
            .collect();
        assert_eq!(
            capacity,
            vec![S::Pending, S::Joining, S::Ready, S::InService]
        );
    }

    #[test]
    fn names_parse_back() {
        for s in S::ALL {
            assert_eq!(S::parse(s.as_str()), Some(s));
        }
        assert_eq!(S::parse("Draining"), None);
    }

    #[test]
    fn errors_name_the_state_and_event() {
        let e = step(S::Pending, E::Drained).unwrap_err();
        assert_eq!(
            e.to_string(),
            "a Pending minion cannot take event 'drained'"
        );
    }
}
