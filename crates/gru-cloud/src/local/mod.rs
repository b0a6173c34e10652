//! The local provider: everything `gru dev` needs on one machine, no cloud
//! account.
//!
//! - [`LocalGroup`] is a [`CapacityGroup`](crate::CapacityGroup) whose
//!   instances are processes on this machine. It behaves like an EC2 Auto
//!   Scaling group: it keeps `desired` instances running, replaces one that
//!   dies, and lowers the desired capacity at most once per terminated
//!   instance.
//! - [`LocalLoadBalancer`] is a [`TargetGroup`](crate::TargetGroup) and a
//!   real TCP proxy in the controller's process, with ELB's least-connections
//!   routing, draining and deregistration delay. A connection ends as soon as
//!   either side closes (MLLP has no use for half a connection).
//!
//! Dropping or shutting down a group stops its instances. Without a state
//! file ([`LaunchSpec::state_file`]) they also never outlive the controller:
//! each is spawned with a parent-death signal (see `sys`). With one, they
//! survive a controller that dies and are adopted by the next one started on
//! the same file, as EC2 instances outlive theirs.

mod group;
mod lb;
mod state;
mod sys;

pub use group::{DEFAULT_STOP_GRACE, LaunchSpec, LocalGroup};
pub use lb::{LocalLoadBalancer, TargetInfo};
pub use state::StateFileError;
