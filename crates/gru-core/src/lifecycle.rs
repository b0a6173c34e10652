//! The minion lifecycle, as the controller sees it (DESIGN.md, "The minion
//! lifecycle"). [`step`] is the whole state machine: every change of a
//! minion's state goes through it, and anything it refuses is a bug or a
//! message out of order, never a silent change.

use std::fmt;

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
    /// Chosen for removal: deregistered first, then told to drain. Does not
    /// count as capacity.
    Draining,
    /// Nothing queued, in flight or connected: safe to terminate.
    Drained,
    /// Terminate issued; waiting for the cloud to confirm.
    Terminating,
    /// The instance no longer exists. Final.
    Gone,
    /// No report within the lost timeout; to be terminated and replaced.
    Lost,
}

impl MinionState {
    pub const ALL: [MinionState; 9] = [
        MinionState::Pending,
        MinionState::Joining,
        MinionState::Ready,
        MinionState::InService,
        MinionState::Draining,
        MinionState::Drained,
        MinionState::Terminating,
        MinionState::Gone,
        MinionState::Lost,
    ];

    /// Minions in these states are the fleet's capacity: what the policy
    /// counts against its desired size. Draining ones are on their way out
    /// and never count.
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
                | MinionState::Draining
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MinionState::Pending => "Pending",
            MinionState::Joining => "Joining",
            MinionState::Ready => "Ready",
            MinionState::InService => "InService",
            MinionState::Draining => "Draining",
            MinionState::Drained => "Drained",
            MinionState::Terminating => "Terminating",
            MinionState::Gone => "Gone",
            MinionState::Lost => "Lost",
        }
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
    /// The controller registered the minion's engine in the load balancer.
    Registered,
    /// The controller or an operator chose the minion for removal.
    DrainChosen,
    /// The agent reported its engine drained, after the Drain command.
    Drained,
    /// The controller issued the terminate call.
    TerminateIssued,
    /// The cloud no longer lists the instance.
    InstanceGone,
    /// No report arrived within the lost timeout.
    ReportsMissed,
}

impl fmt::Display for LifecycleEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            LifecycleEvent::Joined => "joined",
            LifecycleEvent::EngineHealthy => "engine healthy",
            LifecycleEvent::Registered => "registered in the load balancer",
            LifecycleEvent::DrainChosen => "chosen for drain",
            LifecycleEvent::Drained => "drained",
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
    use LifecycleEvent as E;
    use MinionState as S;
    let next = match (state, event) {
        (S::Pending, E::Joined) => S::Joining,
        // A reconnecting agent joins again; its state does not change.
        (S::Joining | S::Ready | S::InService | S::Draining | S::Drained, E::Joined) => state,

        (S::Joining, E::EngineHealthy) => S::Ready,
        (S::Ready | S::InService | S::Draining | S::Drained, E::EngineHealthy) => state,

        (S::Ready, E::Registered) => S::InService,
        (S::InService, E::Registered) => S::InService,

        (S::Pending | S::Joining | S::Ready | S::InService, E::DrainChosen) => S::Draining,
        (S::Draining, E::DrainChosen) => S::Draining,

        (S::Draining, E::Drained) => S::Drained,
        (S::Drained, E::Drained) => S::Drained,

        (S::Drained | S::Lost, E::TerminateIssued) => S::Terminating,
        (S::Terminating, E::TerminateIssued) => S::Terminating,

        // An instance can vanish in any state: terminated by us, replaced by
        // the group, or killed by someone else.
        (_, E::InstanceGone) if state != S::Gone => S::Gone,

        (S::Joining | S::Ready | S::InService | S::Draining, E::ReportsMissed) => S::Lost,

        _ => return Err(InvalidTransition { state, event }),
    };
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use LifecycleEvent as E;
    use MinionState as S;

    const EVENTS: [LifecycleEvent; 8] = [
        E::Joined,
        E::EngineHealthy,
        E::Registered,
        E::DrainChosen,
        E::Drained,
        E::TerminateIssued,
        E::InstanceGone,
        E::ReportsMissed,
    ];

    /// Every (state, event) pair and what it must give: the whole table, so a
    /// change to `step` that is not also made here fails.
    fn expected(state: S, event: E) -> Option<S> {
        Some(match (state, event) {
            (S::Pending, E::Joined) => S::Joining,
            (S::Pending, E::DrainChosen) => S::Draining,
            (S::Pending, E::InstanceGone) => S::Gone,

            (S::Joining, E::Joined) => S::Joining,
            (S::Joining, E::EngineHealthy) => S::Ready,
            (S::Joining, E::DrainChosen) => S::Draining,
            (S::Joining, E::InstanceGone) => S::Gone,
            (S::Joining, E::ReportsMissed) => S::Lost,

            (S::Ready, E::Joined) => S::Ready,
            (S::Ready, E::EngineHealthy) => S::Ready,
            (S::Ready, E::Registered) => S::InService,
            (S::Ready, E::DrainChosen) => S::Draining,
            (S::Ready, E::InstanceGone) => S::Gone,
            (S::Ready, E::ReportsMissed) => S::Lost,

            (S::InService, E::Joined) => S::InService,
            (S::InService, E::EngineHealthy) => S::InService,
            (S::InService, E::Registered) => S::InService,
            (S::InService, E::DrainChosen) => S::Draining,
            (S::InService, E::InstanceGone) => S::Gone,
            (S::InService, E::ReportsMissed) => S::Lost,

            (S::Draining, E::Joined) => S::Draining,
            (S::Draining, E::EngineHealthy) => S::Draining,
            (S::Draining, E::DrainChosen) => S::Draining,
            (S::Draining, E::Drained) => S::Drained,
            (S::Draining, E::InstanceGone) => S::Gone,
            (S::Draining, E::ReportsMissed) => S::Lost,

            (S::Drained, E::Joined) => S::Drained,
            (S::Drained, E::EngineHealthy) => S::Drained,
            (S::Drained, E::Drained) => S::Drained,
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
            for event in EVENTS {
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
            (E::DrainChosen, S::Draining),
            (E::Drained, S::Drained),
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
        for event in EVENTS {
            assert!(step(S::Gone, event).is_err(), "Gone + {event}");
        }
    }

    #[test]
    fn no_terminate_before_drained() {
        for state in [S::Pending, S::Joining, S::Ready, S::InService, S::Draining] {
            assert!(
                step(state, E::TerminateIssued).is_err(),
                "{state} must drain first"
            );
        }
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
    fn errors_name_the_state_and_event() {
        let e = step(S::Pending, E::Drained).unwrap_err();
        assert_eq!(
            e.to_string(),
            "a Pending minion cannot take event 'drained'"
        );
    }
}
