//! gru's domain, pure: the minion lifecycle and the rules that size a fleet.
//!
//! Start with [`lifecycle::step`], the state machine every minion goes
//! through, then [`policy::evaluate`], which turns reported load, the
//! schedule window active now and operator overrides into a desired size
//! with its explanation. [`schedule`] holds the windows (IANA zones, cron or
//! days-and-hours, DST rules), [`cron`] the 5-field expressions they use.
//! [`scaling`] is the first, simpler sizing rule, kept until the controller
//! moves to [`policy`].
//!
//! Invariants: no I/O, no async, no clock. Time comes in as an argument
//! (`now`), so every decision can be replayed and tested exactly. Time zones
//! come from the tz database compiled into the binary, not from the disk.

pub mod cron;
pub mod error;
pub mod lifecycle;
pub mod policy;
pub mod scaling;
pub mod schedule;
pub mod sim;

pub use error::error_chain;
pub use lifecycle::{LifecycleEvent, MinionState, step};
// `policy::Decision` and `policy::Clip` are not re-exported here while the
// names still belong to `scaling`; re-point them once `decide` is retired.
pub use policy::{
    Behaviour, Explanation, ExternalSignal, MinionLoad, Observation, Overrides, Pin, Policy,
    PolicyError, PolicyState, Rule, evaluate,
};
pub use scaling::{Bounds, Decision, DecisionInput, Load, ScaleInWindow, decide, pick_victims};
pub use schedule::{ActiveWindow, Schedule, ScheduleError, ScheduleSpec, WindowSpec};
