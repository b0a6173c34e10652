//! The AWS provider: one EC2 Auto Scaling group and one ELBv2 target group
//! behind gru-cloud's [`CapacityGroup`](gru_cloud::CapacityGroup) and
//! [`TargetGroup`](gru_cloud::TargetGroup) traits, and an SQS queue's
//! backlog as a [`SignalSource`](gru_cloud::SignalSource) ([`SqsSignal`]).
//!
//! Start reading at [`AwsFleet`]: one value per fleet, built by [`connect`]
//! from an [`AwsFleetConfig`]. It implements both traits (module `group` for
//! the Auto Scaling group, `target` for the target group) and has inherent
//! methods for what only AWS has: a detailed group view ([`AwsGroup`]: hook
//! wait states, private IPs, health, protection), lifecycle actions,
//! instance health, scale-in protection, the target group's deregistration
//! delay and whether the target group is attached to the group.
//!
//! Invariants:
//! - Only this crate knows the AWS SDK; callers see gru-cloud's types and the
//!   plain types defined here.
//! - `terminate(id, decrement = true)` lowers the desired capacity at most
//!   once per instance (see `group::AwsFleet::terminate` for the reasoning).
//! - Every SDK failure becomes `CloudError::Provider { call, message }`, with
//!   the AWS error code first in the message.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use gru_cloud::InstanceId;
use tokio::sync::OnceCell;

mod config;
pub mod dynamo;
mod error;
mod group;
mod sqs;
mod target;
#[cfg(feature = "testing")]
pub mod testing;

pub use config::connect;
pub use group::{AwsGroup, AwsInstance, AwsLifecycle};
/// The fleet's settings are plain values in gru-cloud, so the controller can
/// parse and check them without this crate.
pub use gru_cloud::aws::{AwsFleetConfig, AwsSettingsError as ConnectError, DEFAULT_MAX_ATTEMPTS};
pub use gru_cloud::{LifecycleHook, LifecycleResult};
pub use sqs::SqsSignal;
pub use target::DEFAULT_DEREGISTRATION_DELAY;

/// The SDK clients an [`AwsFleet`] talks through. [`connect`] builds them
/// from the default credential chain; tests build their own (another
/// endpoint, retries off, an interceptor) and use [`AwsFleet::from_clients`].
#[derive(Clone, Debug)]
pub struct AwsClients {
    pub autoscaling: aws_sdk_autoscaling::Client,
    pub elb: aws_sdk_elasticloadbalancingv2::Client,
    pub ec2: aws_sdk_ec2::Client,
}

/// One fleet on AWS: its Auto Scaling group and its target group.
#[derive(Debug)]
pub struct AwsFleet {
    config: AwsFleetConfig,
    clients: AwsClients,
    /// Instances for which a decrementing terminate may already have reached
    /// AWS. Guards against a second decrement while DescribeAutoScalingGroups
    /// (eventually consistent) still lists the instance in service. The
    /// `Instant` is when the mark was taken.
    decremented: Mutex<HashMap<InstanceId, Instant>>,
    /// The target group's target type never changes, so it is read once.
    target_kind: OnceCell<target::TargetKind>,
}

impl AwsFleet {
    /// A fleet that talks through `clients`. Does no I/O.
    pub fn from_clients(config: AwsFleetConfig, clients: AwsClients) -> Self {
        AwsFleet {
            config,
            clients,
            decremented: Mutex::new(HashMap::new()),
            target_kind: OnceCell::new(),
        }
    }

    pub fn config(&self) -> &AwsFleetConfig {
        &self.config
    }
}
