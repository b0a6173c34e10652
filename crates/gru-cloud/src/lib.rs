//! Boundary traits between the controller and the outside world, and the
//! `local` provider that `gru dev` runs on.
//!
//! Start reading at [`CapacityGroup`] (what an EC2 Auto Scaling group is to
//! the controller) and [`TargetGroup`] (what an ELBv2 target group is). The
//! controller talks to nothing else when it changes capacity, so a provider
//! is exactly one implementation of each. [`local`] implements both on this
//! machine: instances are child processes, the load balancer is a TCP proxy.
//!
//! Invariant shared by every provider: `terminate(id, decrement = true)`
//! lowers the desired capacity at most once per instance, however often it is
//! called for that instance.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

pub mod aws;
pub mod local;
#[cfg(feature = "testing")]
pub mod testing;

/// A provider's name for one instance (`i-0abc…` on AWS, `i-local-0003` locally).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceId(pub String);

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for InstanceId {
    fn from(s: &str) -> Self {
        InstanceId(s.to_owned())
    }
}

/// Where an instance is in the group's own lifecycle (not the minion's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstanceLifecycle {
    /// Launched, not yet in service in the group.
    Pending,
    /// Running and counted by the group.
    InService,
    /// Termination started; the instance still exists.
    Terminating,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    pub id: InstanceId,
    pub lifecycle: InstanceLifecycle,
    pub launched_at: SystemTime,
}

/// A snapshot of a capacity group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupState {
    pub desired: u32,
    /// The group's own bounds; a fleet's bounds are clipped by these.
    pub min: u32,
    pub max: u32,
    /// Every instance the group still has, terminating ones included.
    pub instances: Vec<Instance>,
}

#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("desired capacity {desired} is outside the group's bounds {min}..={max}")]
    OutOfBounds { desired: u32, min: u32, max: u32 },
    #[error("failed to launch instance {instance}")]
    Launch {
        instance: InstanceId,
        #[source]
        source: std::io::Error,
    },
    #[error("provider call {call} failed: {message}")]
    Provider { call: &'static str, message: String },
    /// The provider refused the call outright (a validation error,
    /// throttling, access denied): it certainly changed nothing.
    #[error("provider call {call} refused: {message}")]
    Refused { call: &'static str, message: String },
}

impl CloudError {
    /// True when the failed call certainly changed nothing, so a guard
    /// taken for it (a decrement claimed in the ledger) can be dropped. A
    /// timeout or a server error may hide a call that was applied.
    pub fn certainly_not_applied(&self) -> bool {
        match self {
            CloudError::NotFound { .. }
            | CloudError::OutOfBounds { .. }
            | CloudError::Launch { .. }
            | CloudError::Refused { .. } => true,
            CloudError::Provider { .. } => false,
        }
    }
}

/// A group of interchangeable instances whose size the controller sets.
///
/// The controller is the only writer of the desired capacity. It scales out
/// with [`CapacityGroup::set_desired`] and scales in only by terminating a
/// drained instance with `decrement = true`, never by lowering the desired
/// capacity and letting the group choose.
#[async_trait]
pub trait CapacityGroup: Send + Sync + 'static {
    async fn describe(&self) -> Result<GroupState, CloudError>;
    async fn set_desired(&self, desired: u32) -> Result<(), CloudError>;
    /// Terminates one instance. With `decrement` the desired capacity drops
    /// by one in the same step, so the group does not replace it. Calling it
    /// again for an instance already terminating or gone changes nothing.
    async fn terminate(&self, id: &InstanceId, decrement: bool) -> Result<(), CloudError>;
    /// Whether the instance runs now, as the provider sees it (on EC2, its
    /// state is `running`, not stopped or stopping). By default: the group
    /// lists it and it is not terminating.
    async fn running(&self, id: &InstanceId) -> Result<bool, CloudError> {
        Ok(self
            .describe()
            .await?
            .instances
            .iter()
            .any(|i| &i.id == id && i.lifecycle != InstanceLifecycle::Terminating))
    }
}

/// One load-balancer target: an instance and the address its engine listens on.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    pub instance: InstanceId,
    pub address: SocketAddr,
}

/// A target as the load balancer sees it (the ELBv2 target states that matter).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetState {
    /// Not registered and carrying no connections.
    Unused,
    /// Registered, not yet receiving connections.
    Initial,
    /// Registered and receiving new connections.
    Healthy,
    /// Deregistered: gets no new connections; existing ones may remain until
    /// they close or the deregistration delay cuts them.
    Draining,
}

impl TargetState {
    /// True when the load balancer will send this target no new connection.
    pub fn takes_no_new_connections(self) -> bool {
        matches!(self, TargetState::Unused | TargetState::Draining)
    }
}

/// The load balancer's view of a fleet's engines.
#[async_trait]
pub trait TargetGroup: Send + Sync + 'static {
    /// Idempotent: registering a registered target changes nothing.
    async fn register(&self, target: &Target) -> Result<(), CloudError>;
    /// Idempotent: deregistering an unknown or draining target changes nothing.
    async fn deregister(&self, target: &Target) -> Result<(), CloudError>;
    async fn target_state(&self, target: &Target) -> Result<TargetState, CloudError>;
    /// How many connections the load balancer has sent this target since it
    /// was registered, where the provider can tell (the local one can; ELB
    /// cannot per target). The controller records it at deregistration and
    /// again when the drain starts, as evidence that nothing new arrived.
    fn connections_total(&self, _target: &Target) -> Option<u64> {
        None
    }
}

/// Which of a group's lifecycle hooks an action is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LifecycleHook {
    Launching,
    Terminating,
}

/// How the controller ends a lifecycle action.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LifecycleResult {
    /// Go on: launch into service, or terminate.
    Continue,
    /// Launching: terminate and replace the instance. Terminating: the same
    /// as Continue, but other hooks are skipped.
    Abandon,
}

impl LifecycleResult {
    pub fn as_str(self) -> &'static str {
        match self {
            LifecycleResult::Continue => "CONTINUE",
            LifecycleResult::Abandon => "ABANDON",
        }
    }
}

/// A group with what only a group with lifecycle hooks shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookedGroup {
    pub group: GroupState,
    /// Held in `Pending:Wait` by the launching hook the fleet names.
    pub pending_wait: HashSet<InstanceId>,
    /// Held in `Terminating:Wait` by the terminating hook the fleet names.
    pub terminating_wait: HashSet<InstanceId>,
    /// In service in the group.
    pub in_service: HashSet<InstanceId>,
    /// Protected from the group's own scale-ins.
    pub protected: HashSet<InstanceId>,
}

/// How the group and its target group are set up, read once per fleet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetGroupSetup {
    /// The target group is attached to the group, which then registers and
    /// deregisters instances itself.
    pub attached: bool,
    /// The target group's deregistration delay.
    pub deregistration_delay: Duration,
}

/// A number from outside the fleet that a policy rule sizes on, such as an
/// SQS queue's backlog. Read once per reconcile pass. Its value sees work
/// the fleet's minions cannot report: it can wake a fleet from zero.
#[async_trait]
pub trait SignalSource: Send + Sync + 'static {
    /// The name the policy's rule and `gru explain` know it by (`sqs`).
    fn name(&self) -> &str;
    async fn read(&self) -> Result<u64, CloudError>;
}

/// What a group with lifecycle hooks adds (an EC2 Auto Scaling group):
/// hook wait states and their actions, instance health, scale-in
/// protection, and the target group's settings. The AWS provider implements
/// it; the local provider has none of it; `testing` has a scripted fake.
#[async_trait]
pub trait GroupLifecycle: Send + Sync + 'static {
    /// The group, with the instances its hooks hold and protection.
    async fn describe_hooked(&self) -> Result<HookedGroup, CloudError>;
    async fn target_group_setup(&self) -> Result<TargetGroupSetup, CloudError>;
    /// Ends the lifecycle action holding `id`.
    async fn complete_lifecycle_action(
        &self,
        id: &InstanceId,
        hook: LifecycleHook,
        result: LifecycleResult,
    ) -> Result<(), CloudError>;
    /// Restarts the hook's heartbeat timeout for `id`.
    async fn record_lifecycle_heartbeat(
        &self,
        id: &InstanceId,
        hook: LifecycleHook,
    ) -> Result<(), CloudError>;
    /// Marks `id` unhealthy at once, so the group replaces it.
    async fn set_unhealthy(&self, id: &InstanceId) -> Result<(), CloudError>;
    /// Protects (or unprotects) instances from the group's own scale-ins.
    async fn set_scale_in_protection(
        &self,
        ids: &[InstanceId],
        protected: bool,
    ) -> Result<(), CloudError>;
}
