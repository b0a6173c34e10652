//! The ELBv2 target group: [`TargetGroup`] for [`AwsFleet`], and its
//! deregistration delay.

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_elasticloadbalancingv2::types::{
    TargetDescription, TargetHealthStateEnum, TargetTypeEnum,
};
use gru_cloud::{CloudError, Target, TargetGroup, TargetState};
use tracing::info;

use aws_sdk_elasticloadbalancingv2::error::{ProvideErrorMetadata, SdkError};

use crate::AwsFleet;
use crate::error;

/// ELBv2's default deregistration delay, used when the target group's
/// attributes do not list one.
pub const DEFAULT_DEREGISTRATION_DELAY: Duration = Duration::from_secs(300);
const DEREGISTRATION_DELAY_KEY: &str = "deregistration_delay.timeout_seconds";

/// How the target group names a target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TargetKind {
    /// By instance id (and port).
    Instance,
    /// By private IP address (and port).
    Ip,
}

/// A target state from DescribeTargetHealth. Registered states that are
/// not plainly healthy map to the nearest state that still forbids
/// terminating the target: `unhealthy` (registered; gets connections again
/// once healthy, or when every target is unhealthy) to Initial, and
/// `unavailable` (health checks disabled: it gets connections) to Healthy.
fn target_state(state: &TargetHealthStateEnum) -> Option<TargetState> {
    Some(match state {
        TargetHealthStateEnum::Healthy | TargetHealthStateEnum::Unavailable => TargetState::Healthy,
        TargetHealthStateEnum::Initial | TargetHealthStateEnum::Unhealthy => TargetState::Initial,
        TargetHealthStateEnum::Draining | TargetHealthStateEnum::UnhealthyDraining => {
            TargetState::Draining
        }
        TargetHealthStateEnum::Unused => TargetState::Unused,
        _ => return None,
    })
}

impl AwsFleet {
    async fn target_kind(&self) -> Result<TargetKind, CloudError> {
        self.target_kind
            .get_or_try_init(|| async {
                let out = self
                    .clients
                    .elb
                    .describe_target_groups()
                    .target_group_arns(&self.config.target_group_arn)
                    .send()
                    .await
                    .map_err(|e| self.target_group_error("DescribeTargetGroups", &e))?;
                let group = out
                    .target_groups()
                    .first()
                    .ok_or_else(|| self.target_group_not_found())?;
                match group.target_type() {
                    Some(TargetTypeEnum::Instance) | None => Ok(TargetKind::Instance),
                    Some(TargetTypeEnum::Ip) => Ok(TargetKind::Ip),
                    Some(other) => Err(CloudError::Provider {
                        call: "DescribeTargetGroups",
                        message: format!(
                            "target group {} has target type {}; gru registers instances or IPs",
                            self.config.target_group_arn,
                            other.as_str()
                        ),
                    }),
                }
            })
            .await
            .copied()
    }

    fn target_group_not_found(&self) -> CloudError {
        CloudError::NotFound {
            what: format!("target group {}", self.config.target_group_arn),
        }
    }

    /// `NotFound` when the target group does not exist, else the call's error.
    fn target_group_error<E, R>(&self, call: &'static str, e: &SdkError<E, R>) -> CloudError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        if error::code(e) == Some("TargetGroupNotFound") {
            self.target_group_not_found()
        } else {
            error::provider(call, e)
        }
    }

    async fn describe_target(&self, target: &Target) -> Result<TargetDescription, CloudError> {
        let id = match self.target_kind().await? {
            TargetKind::Instance => target.instance.0.clone(),
            TargetKind::Ip => target.address.ip().to_string(),
        };
        Ok(TargetDescription::builder()
            .id(id)
            .port(i32::from(target.address.port()))
            .build())
    }

    /// The target group's `deregistration_delay.timeout_seconds`: how long
    /// the load balancer keeps a deregistered target's connections before it
    /// cuts them. It bounds the wait for a drained target to show `unused`.
    pub async fn deregistration_delay(&self) -> Result<Duration, CloudError> {
        let out = self
            .clients
            .elb
            .describe_target_group_attributes()
            .target_group_arn(&self.config.target_group_arn)
            .send()
            .await
            .map_err(|e| self.target_group_error("DescribeTargetGroupAttributes", &e))?;
        let Some(value) = out
            .attributes()
            .iter()
            .find(|a| a.key() == Some(DEREGISTRATION_DELAY_KEY))
            .and_then(|a| a.value())
        else {
            return Ok(DEFAULT_DEREGISTRATION_DELAY);
        };
        value
            .parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|_| CloudError::Provider {
                call: "DescribeTargetGroupAttributes",
                message: format!(
                    "{DEREGISTRATION_DELAY_KEY} is {value:?}, not a number of seconds"
                ),
            })
    }
}

#[async_trait]
impl TargetGroup for AwsFleet {
    async fn register(&self, target: &Target) -> Result<(), CloudError> {
        let description = self.describe_target(target).await?;
        self.clients
            .elb
            .register_targets()
            .target_group_arn(&self.config.target_group_arn)
            .targets(description)
            .send()
            .await
            .map_err(|e| error::provider("RegisterTargets", &e))?;
        info!(instance = %target.instance, address = %target.address, "target registered");
        Ok(())
    }

    /// AWS answers InvalidTarget for a target it cannot take (one that is
    /// not registered, or whose instance is gone): nothing to deregister.
    async fn deregister(&self, target: &Target) -> Result<(), CloudError> {
        let description = self.describe_target(target).await?;
        match self
            .clients
            .elb
            .deregister_targets()
            .target_group_arn(&self.config.target_group_arn)
            .targets(description)
            .send()
            .await
        {
            Ok(_) => {
                info!(instance = %target.instance, address = %target.address, "target deregistered");
                Ok(())
            }
            Err(e) if error::code(&e) == Some("InvalidTarget") => Ok(()),
            Err(e) => Err(error::provider("DeregisterTargets", &e)),
        }
    }

    /// A target AWS does not list, or refuses to describe as invalid (its
    /// instance is gone), is `Unused`.
    async fn target_state(&self, target: &Target) -> Result<TargetState, CloudError> {
        let description = self.describe_target(target).await?;
        let out = match self
            .clients
            .elb
            .describe_target_health()
            .target_group_arn(&self.config.target_group_arn)
            .targets(description)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if error::code(&e) == Some("InvalidTarget") => return Ok(TargetState::Unused),
            Err(e) => return Err(error::provider("DescribeTargetHealth", &e)),
        };
        let Some(state) = out
            .target_health_descriptions()
            .first()
            .and_then(|d| d.target_health())
            .and_then(|h| h.state())
        else {
            return Ok(TargetState::Unused);
        };
        target_state(state).ok_or_else(|| CloudError::Provider {
            call: "DescribeTargetHealth",
            message: format!("unknown target state {:?}", state.as_str()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_registered_state_forbids_termination() {
        for s in ["healthy", "initial", "unhealthy", "unavailable"] {
            let state = target_state(&TargetHealthStateEnum::from(s)).unwrap();
            assert!(!state.takes_no_new_connections(), "{s}");
        }
        for s in ["draining", "unhealthy.draining", "unused"] {
            let state = target_state(&TargetHealthStateEnum::from(s)).unwrap();
            assert!(state.takes_no_new_connections(), "{s}");
        }
        assert_eq!(
            target_state(&TargetHealthStateEnum::from("gone.fishing")),
            None
        );
    }
}
