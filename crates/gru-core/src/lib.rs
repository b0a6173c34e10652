//! gru's domain, pure: the minion lifecycle and the rules that size a fleet.
//!
//! Start with [`lifecycle::step`], the state machine every minion goes
//! through, then [`policy::evaluate`], which turns reported load, the
//! schedule window active now and operator overrides into a desired size
//! with its explanation. [`schedule`] holds the windows (IANA zones, cron or
//! days-and-hours, DST rules), [`cron`] the 5-field expressions they use.
//! [`scaling`] holds the bounds and the choice of victims both share, and
//! [`sim`] replays a traffic trace against a policy on a virtual clock.
//! [`forecast`] keeps a fleet's demand history and forecasts from it.
//! [`rebalance`] spreads long-lived connections onto new minions.
//!
//! Invariants: no I/O, no async, no clock. Time comes in as an argument
//! (`now`), so every decision can be replayed and tested exactly. Time zones
//! come from the tz database compiled into the binary, not from the disk.

pub mod cron;
pub mod error;
pub mod forecast;
pub mod lifecycle;
pub mod plan;
pub mod policy;
pub mod rebalance;
pub mod scaling;
pub mod schedule;
pub mod sim;

pub use error::error_chain;
pub use lifecycle::{DrainPhase, LifecycleEvent, MinionState, step};
pub use policy::{
    Behaviour, Clip, Decision, Explanation, ExternalSignal, MinionLoad, Observation, Overrides,
    Pin, Policy, PolicyError, PolicyMemory, PolicyState, Rule, evaluate,
};
pub use scaling::{Bounds, Load, pick_victims};
pub use schedule::{ActiveWindow, Schedule, ScheduleError, ScheduleSpec, WindowSpec};
