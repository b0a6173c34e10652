//! The arithmetic the policy and the controller share: a fleet's bounds, a
//! minion's load, and the choice of which minions to drain. The sizing
//! itself is [`crate::policy`].

use crate::lifecycle::MinionState;

/// A fleet's size limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    pub min: u32,
    pub max: u32,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BoundsError {
    #[error("min ({min}) must not be greater than max ({max})")]
    MinAboveMax { min: u32, max: u32 },
}

impl Bounds {
    pub fn new(min: u32, max: u32) -> Result<Self, BoundsError> {
        if min > max {
            return Err(BoundsError::MinAboveMax { min, max });
        }
        Ok(Bounds { min, max })
    }

    pub fn clamp(self, n: u32) -> u32 {
        n.clamp(self.min, self.max)
    }
}

/// The work one minion reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Load {
    pub queue_depth: u64,
    pub in_flight: u64,
}

impl Load {
    pub fn work(self) -> u64 {
        self.queue_depth.saturating_add(self.in_flight)
    }
}

/// A candidate for scale-in.
#[derive(Clone, Debug)]
pub struct Candidate<Id> {
    pub id: Id,
    pub state: MinionState,
    pub load: Load,
}

/// Picks `n` minions to drain: first those not yet taking work (Pending,
/// Joining, Ready), then the ones with the least queued and in-flight work.
/// Only minions that count as capacity are eligible.
pub fn pick_victims<Id: Clone + Ord>(candidates: &[Candidate<Id>], n: usize) -> Vec<Id> {
    let mut eligible: Vec<&Candidate<Id>> = candidates
        .iter()
        .filter(|c| c.state.counts_as_capacity())
        .collect();
    eligible.sort_by(|a, b| {
        let serving = |c: &Candidate<Id>| c.state == MinionState::InService;
        serving(a)
            .cmp(&serving(b))
            .then(a.load.work().cmp(&b.load.work()))
            .then_with(|| a.id.cmp(&b.id))
    });
    eligible.into_iter().take(n).map(|c| c.id.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(q: u64, f: u64) -> Load {
        Load {
            queue_depth: q,
            in_flight: f,
        }
    }

    #[test]
    fn min_above_max_is_refused() {
        assert_eq!(
            Bounds::new(3, 2),
            Err(BoundsError::MinAboveMax { min: 3, max: 2 })
        );
        assert_eq!(
            Bounds::new(2, 5).map(|b| (b.clamp(0), b.clamp(9))),
            Ok((2, 5))
        );
    }

    #[test]
    fn victims_are_idle_newcomers_first_then_least_loaded() {
        let c = |id: &str, state, q| Candidate {
            id: id.to_owned(),
            state,
            load: load(q, 0),
        };
        let candidates = [
            c("a", MinionState::InService, 5),
            c("b", MinionState::InService, 1),
            c("c", MinionState::Pending, 0),
            c("d", MinionState::DRAINING, 0),
            c("e", MinionState::InService, 3),
        ];
        assert_eq!(pick_victims(&candidates, 3), vec!["c", "b", "e"]);
        assert_eq!(
            pick_victims(&candidates, 10).len(),
            4,
            "draining ones are not eligible"
        );
    }
}
