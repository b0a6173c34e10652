//! Sizing a fleet: the queue-depth rule, the scale-in window, operator
//! overrides, and the choice of which minions to drain.
//!
//! Everything here is a function of its arguments: `now` comes in as an
//! argument, no clock is read.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

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

/// Everything one decision is made from.
#[derive(Clone, Debug)]
pub struct DecisionInput<'a> {
    pub bounds: Bounds,
    /// Queued plus in-flight messages one minion should carry.
    pub target_work_per_minion: u32,
    /// The loads of the minions that count as capacity and have reported.
    pub loads: &'a [Load],
    /// Minions that count as capacity now.
    pub capacity: u32,
    /// An operator's pin: the fleet's size, whatever the load.
    pub pinned: Option<u32>,
}

/// What clipped the rule's raw recommendation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clip {
    Min,
    Max,
    /// Held up by a higher recommendation inside the scale-in window.
    ScaleInWindow,
}

/// A decision and why it was made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub desired: u32,
    /// The queue-depth rule's recommendation before any clipping.
    pub raw: u32,
    pub total_work: u64,
    pub clipped_by: Option<Clip>,
    pub pinned: bool,
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.pinned {
            return write!(f, "pinned at {} by an operator", self.desired);
        }
        write!(
            f,
            "queued+in-flight {} → {} by queue depth",
            self.total_work, self.raw
        )?;
        match self.clipped_by {
            Some(Clip::Min) => write!(f, ", raised to min {}", self.desired),
            Some(Clip::Max) => write!(f, ", capped at max {}", self.desired),
            Some(Clip::ScaleInWindow) => {
                write!(f, ", held at {} by the scale-in window", self.desired)
            }
            None => Ok(()),
        }
    }
}

/// desired = ceil(work / target per minion), within the bounds.
pub fn queue_depth_rule(input: &DecisionInput<'_>) -> Decision {
    let total_work: u64 = input.loads.iter().map(|l| l.work()).sum();
    let target = u64::from(input.target_work_per_minion.max(1));
    let raw = u32::try_from(total_work.div_ceil(target)).unwrap_or(u32::MAX);
    let desired = input.bounds.clamp(raw);
    let clipped_by = if desired > raw {
        Some(Clip::Min)
    } else if desired < raw {
        Some(Clip::Max)
    } else {
        None
    };
    Decision {
        desired,
        raw,
        total_work,
        clipped_by,
        pinned: false,
    }
}

/// Scale out at once, scale in only to the highest recommendation seen over
/// the window, so a brief lull does not remove capacity that the next burst
/// needs.
#[derive(Clone, Debug)]
pub struct ScaleInWindow {
    window: Duration,
    recent: VecDeque<(Instant, u32)>,
}

impl ScaleInWindow {
    pub fn new(window: Duration) -> Self {
        ScaleInWindow {
            window,
            recent: VecDeque::new(),
        }
    }

    /// Records `recommended` at `now` and returns the highest recommendation
    /// within the window (including this one).
    pub fn apply(&mut self, now: Instant, recommended: u32) -> u32 {
        while let Some(&(at, _)) = self.recent.front() {
            if now.saturating_duration_since(at) > self.window {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        // Older entries at or below the new value can never be the maximum
        // again: keep the deque decreasing so it stays short.
        while let Some(&(_, v)) = self.recent.back() {
            if v <= recommended {
                self.recent.pop_back();
            } else {
                break;
            }
        }
        self.recent.push_back((now, recommended));
        self.recent.front().map_or(recommended, |&(_, v)| v)
    }

    /// Forgets the history, e.g. after an operator pin ends.
    pub fn reset(&mut self) {
        self.recent.clear();
    }
}

/// The decision for one evaluation: the pin if any, else the queue-depth rule
/// held up by the scale-in window.
pub fn decide(input: &DecisionInput<'_>, window: &mut ScaleInWindow, now: Instant) -> Decision {
    let mut decision = queue_depth_rule(input);
    if let Some(pin) = input.pinned {
        window.reset();
        return Decision {
            desired: pin,
            clipped_by: None,
            pinned: true,
            ..decision
        };
    }
    let held = window.apply(now, decision.desired);
    if held > decision.desired {
        decision.desired = held;
        decision.clipped_by = Some(Clip::ScaleInWindow);
    }
    decision
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
    use proptest::prelude::*;

    fn input(loads: &[Load], min: u32, max: u32) -> DecisionInput<'_> {
        DecisionInput {
            bounds: Bounds::new(min, max).expect("valid bounds"),
            target_work_per_minion: 4,
            loads,
            capacity: loads.len() as u32,
            pinned: None,
        }
    }

    fn load(q: u64, f: u64) -> Load {
        Load {
            queue_depth: q,
            in_flight: f,
        }
    }

    #[test]
    fn desired_is_work_over_target_rounded_up() {
        let loads = [load(5, 1), load(3, 0)];
        let d = queue_depth_rule(&input(&loads, 1, 10));
        assert_eq!(
            (d.raw, d.desired, d.total_work, d.clipped_by),
            (3, 3, 9, None)
        );
    }

    #[test]
    fn bounds_clip_and_say_so() {
        let idle = [load(0, 0)];
        let d = queue_depth_rule(&input(&idle, 2, 5));
        assert_eq!((d.desired, d.clipped_by), (2, Some(Clip::Min)));
        assert_eq!(
            d.to_string(),
            "queued+in-flight 0 → 0 by queue depth, raised to min 2"
        );
        let busy = [load(100, 0)];
        let d = queue_depth_rule(&input(&busy, 0, 5));
        assert_eq!((d.desired, d.clipped_by), (5, Some(Clip::Max)));
    }

    #[test]
    fn min_above_max_is_refused() {
        assert_eq!(
            Bounds::new(3, 2),
            Err(BoundsError::MinAboveMax { min: 3, max: 2 })
        );
    }

    #[test]
    fn scale_out_is_immediate_scale_in_waits_for_the_window() {
        let t0 = Instant::now();
        let mut w = ScaleInWindow::new(Duration::from_secs(30));
        let busy = [load(16, 0)];
        let idle = [load(0, 0)];
        assert_eq!(decide(&input(&busy, 1, 10), &mut w, t0).desired, 4);
        let d = decide(&input(&idle, 1, 10), &mut w, t0 + Duration::from_secs(10));
        assert_eq!((d.desired, d.clipped_by), (4, Some(Clip::ScaleInWindow)));
        let d = decide(&input(&idle, 1, 10), &mut w, t0 + Duration::from_secs(31));
        assert_eq!((d.desired, d.clipped_by), (1, Some(Clip::Min)));
    }

    #[test]
    fn a_pin_wins_over_load() {
        let mut w = ScaleInWindow::new(Duration::from_secs(30));
        let busy = [load(40, 0)];
        let mut i = input(&busy, 1, 10);
        i.pinned = Some(2);
        let d = decide(&i, &mut w, Instant::now());
        assert_eq!((d.desired, d.pinned), (2, true));
        assert_eq!(d.to_string(), "pinned at 2 by an operator");
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
            c("d", MinionState::Draining, 0),
            c("e", MinionState::InService, 3),
        ];
        assert_eq!(pick_victims(&candidates, 3), vec!["c", "b", "e"]);
        assert_eq!(
            pick_victims(&candidates, 10).len(),
            4,
            "draining ones are not eligible"
        );
    }

    proptest! {
        #[test]
        fn desired_always_within_bounds(
            works in proptest::collection::vec((0u64..1_000, 0u64..100), 0..50),
            min in 0u32..20, extra in 0u32..50, target in 1u32..50,
            steps in proptest::collection::vec(0u64..120, 1..20),
        ) {
            let loads: Vec<Load> = works.iter().map(|&(q, f)| load(q, f)).collect();
            let bounds = Bounds::new(min, min + extra).expect("valid");
            let mut w = ScaleInWindow::new(Duration::from_secs(60));
            let mut now = Instant::now();
            for s in steps {
                now += Duration::from_secs(s);
                let i = DecisionInput { bounds, target_work_per_minion: target, loads: &loads, capacity: 0, pinned: None };
                let d = decide(&i, &mut w, now);
                prop_assert!(d.desired >= bounds.min && d.desired <= bounds.max);
            }
        }

        #[test]
        fn enough_minions_for_the_work_when_max_allows(
            works in proptest::collection::vec((0u64..1_000, 0u64..100), 0..50),
            target in 1u32..50,
        ) {
            let loads: Vec<Load> = works.iter().map(|&(q, f)| load(q, f)).collect();
            let i = DecisionInput { bounds: Bounds { min: 0, max: u32::MAX }, target_work_per_minion: target, loads: &loads, capacity: 0, pinned: None };
            let d = queue_depth_rule(&i);
            let work: u64 = loads.iter().map(|l| l.work()).sum();
            prop_assert!(u64::from(d.desired) * u64::from(target) >= work);
            prop_assert!(d.desired == 0 || u64::from(d.desired - 1) * u64::from(target) < work);
        }

        #[test]
        fn window_never_returns_less_than_now_nor_more_than_seen(
            recs in proptest::collection::vec((0u64..30, 0u32..100), 1..60),
        ) {
            let mut w = ScaleInWindow::new(Duration::from_secs(60));
            let mut now = Instant::now();
            let mut seen: Vec<(Instant, u32)> = Vec::new();
            for (dt, r) in recs {
                now += Duration::from_secs(dt);
                seen.push((now, r));
                let held = w.apply(now, r);
                let max_in_window = seen.iter()
                    .filter(|(t, _)| now.duration_since(*t) <= Duration::from_secs(60))
                    .map(|&(_, v)| v).max().unwrap_or(r);
                prop_assert_eq!(held, max_in_window);
            }
        }
    }
}
