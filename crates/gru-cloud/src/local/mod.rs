//! The local provider: everything `gru dev` needs on one machine, no cloud
//! account.
//!
//! - [`LocalGroup`] is a [`CapacityGroup`](crate::CapacityGroup) whose
//!   instances are child processes. It behaves like an EC2 Auto Scaling
//!   group: it keeps `desired` instances running, replaces one that dies, and
//!   lowers the desired capacity at most once per terminated instance.
//! - [`LocalLoadBalancer`] is a [`TargetGroup`](crate::TargetGroup) and a
//!   real TCP proxy in the controller's process, with ELB's least-connections
//!   routing, draining and deregistration delay.
//!
//! Children never outlive the controller: each is spawned with a parent-death
//! signal (see `sys`), and dropping or shutting down a group stops them.

mod group;
mod lb;
mod sys;

pub use group::{DEFAULT_STOP_GRACE, LaunchSpec, LocalGroup};
pub use lb::{LocalLoadBalancer, TargetInfo};
