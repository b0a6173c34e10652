//! gru's domain, pure: the minion lifecycle and the rules that size a fleet.
//!
//! Start with [`lifecycle::step`], the state machine every minion goes
//! through, then [`scaling::decide`], which turns reported load into a
//! desired size with its explanation.
//!
//! Invariants: no I/O, no async, no clock. Time comes in as an argument
//! (`now: Instant`), so every decision can be replayed and tested exactly.

pub mod lifecycle;
pub mod scaling;

pub use lifecycle::{LifecycleEvent, MinionState, step};
pub use scaling::{Bounds, Decision, DecisionInput, Load, ScaleInWindow, decide, pick_victims};
