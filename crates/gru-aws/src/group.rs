//! The Auto Scaling group: [`CapacityGroup`] for [`AwsFleet`], and the
//! operations only AWS has (lifecycle actions, instance health, scale-in
//! protection) as inherent methods.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use aws_sdk_autoscaling::config::retry::RetryConfig;
use aws_sdk_autoscaling::types::LifecycleState;
use aws_sdk_ec2::types::Filter;
use gru_cloud::{
    CapacityGroup, CloudError, GroupLifecycle, GroupState, HookedGroup, Instance, InstanceId,
    InstanceLifecycle, LifecycleHook, LifecycleResult, TargetGroupSetup,
};
use tracing::{debug, info};

use crate::AwsFleet;
use crate::error;

/// Instance ids per DescribeInstances filter (EC2 takes up to 200 values).
const DESCRIBE_INSTANCES_CHUNK: usize = 100;
/// A decrement mark is dropped once its instance is no longer listed in the
/// group and the mark is older than this: far longer than
/// DescribeAutoScalingGroups takes to catch up after a terminate.
const DECREMENT_MARK_TTL: Duration = Duration::from_secs(15 * 60);
/// Instance ids per SetInstanceProtection call (the API's limit).
const PROTECTION_CHUNK: usize = 50;

/// An instance's state in the group's own lifecycle, as AWS names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AwsLifecycle {
    /// Launching.
    Pending,
    /// Launched and held by a launching lifecycle hook until the controller
    /// completes the action (or the hook times out).
    PendingWait,
    /// The launching action was completed; about to be InService.
    PendingProceed,
    /// Replaced soon: a warm-pool instance that failed to start.
    Quarantined,
    InService,
    /// Moving to, or in, standby: running, in the group, not counted.
    EnteringStandby,
    Standby,
    /// Termination started.
    Terminating,
    /// Termination started and held by a terminating lifecycle hook until
    /// the controller completes the action (or the hook times out).
    TerminatingWait,
    TerminatingProceed,
    Terminated,
    /// Being detached from the group, or detached.
    Detaching,
    Detached,
    /// A state this build does not know (AWS adds some now and then).
    Other(String),
}

impl AwsLifecycle {
    fn from_sdk(state: &LifecycleState) -> Self {
        match state {
            LifecycleState::Pending => Self::Pending,
            LifecycleState::PendingWait => Self::PendingWait,
            LifecycleState::PendingProceed => Self::PendingProceed,
            LifecycleState::Quarantined => Self::Quarantined,
            LifecycleState::InService => Self::InService,
            LifecycleState::EnteringStandby => Self::EnteringStandby,
            LifecycleState::Standby => Self::Standby,
            LifecycleState::Terminating => Self::Terminating,
            LifecycleState::TerminatingWait => Self::TerminatingWait,
            LifecycleState::TerminatingProceed => Self::TerminatingProceed,
            LifecycleState::Terminated => Self::Terminated,
            LifecycleState::Detaching => Self::Detaching,
            LifecycleState::Detached => Self::Detached,
            other => Self::Other(other.as_str().to_owned()),
        }
    }

    /// True once the instance is on its way out of the group: terminating,
    /// terminated or detaching. Terminating such an instance again must not
    /// decrement the desired capacity.
    pub fn is_leaving(&self) -> bool {
        matches!(
            self,
            Self::Terminating
                | Self::TerminatingWait
                | Self::TerminatingProceed
                | Self::Terminated
                | Self::Detaching
                | Self::Detached
        )
    }

    /// The provider-neutral state. Standby counts as in service (running and
    /// in the group; the controller sees its minion report either way);
    /// quarantined and unknown states as pending, never as terminating, so
    /// nothing is dropped on a guess.
    pub fn to_cloud(&self) -> InstanceLifecycle {
        if self.is_leaving() {
            InstanceLifecycle::Terminating
        } else if matches!(
            self,
            Self::InService | Self::EnteringStandby | Self::Standby
        ) {
            InstanceLifecycle::InService
        } else {
            InstanceLifecycle::Pending
        }
    }
}

/// One instance of the group, with what EC2 adds about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AwsInstance {
    pub id: InstanceId,
    pub lifecycle: AwsLifecycle,
    /// The group's health check verdict (`Healthy`/`Unhealthy`).
    pub healthy: bool,
    pub protected_from_scale_in: bool,
    pub availability_zone: Option<String>,
    /// From DescribeInstances; `None` until EC2 lists the instance (EC2 is
    /// eventually consistent with the group) or when it has none.
    pub private_ip: Option<IpAddr>,
    pub launched_at: Option<SystemTime>,
}

/// A snapshot of the Auto Scaling group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AwsGroup {
    pub desired: u32,
    pub min: u32,
    pub max: u32,
    pub instances: Vec<AwsInstance>,
    /// Target groups attached to the group (its TargetGroupARNs and its
    /// ELBv2 traffic sources): the group registers its instances there itself.
    pub attached_target_groups: Vec<String>,
}

impl AwsGroup {
    /// The provider-neutral snapshot. An instance EC2 does not list yet is
    /// taken as launched at `now`, so a join timeout never starts early.
    pub fn to_group_state(&self, now: SystemTime) -> GroupState {
        GroupState {
            desired: self.desired,
            min: self.min,
            max: self.max,
            instances: self
                .instances
                .iter()
                .map(|i| Instance {
                    id: i.id.clone(),
                    lifecycle: i.lifecycle.to_cloud(),
                    launched_at: i.launched_at.unwrap_or(now),
                })
                .collect(),
        }
    }

    /// Instances held by `hook`, waiting for the controller's action.
    pub fn awaiting(&self, hook: LifecycleHook) -> impl Iterator<Item = &AwsInstance> {
        let state = match hook {
            LifecycleHook::Launching => AwsLifecycle::PendingWait,
            LifecycleHook::Terminating => AwsLifecycle::TerminatingWait,
        };
        self.instances.iter().filter(move |i| i.lifecycle == state)
    }

    pub fn instance(&self, id: &InstanceId) -> Option<&AwsInstance> {
        self.instances.iter().find(|i| &i.id == id)
    }
}

fn count(value: Option<i32>) -> u32 {
    value.and_then(|v| u32::try_from(v).ok()).unwrap_or(0)
}

impl AwsFleet {
    fn hook_name(&self, hook: LifecycleHook) -> Result<&str, CloudError> {
        let (name, what) = match hook {
            LifecycleHook::Launching => (&self.config.launching_hook, "launching_hook"),
            LifecycleHook::Terminating => (&self.config.terminating_hook, "terminating_hook"),
        };
        name.as_deref().ok_or_else(|| CloudError::NotFound {
            what: format!("{what} in the config of group {}", self.config.group_name),
        })
    }

    /// The group from DescribeAutoScalingGroups alone: no EC2 details.
    async fn describe_group_only(&self) -> Result<AwsGroup, CloudError> {
        let out = self
            .clients
            .autoscaling
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(&self.config.group_name)
            .send()
            .await
            .map_err(|e| error::provider("DescribeAutoScalingGroups", &e))?;
        let group = out
            .auto_scaling_groups()
            .iter()
            .find(|g| g.auto_scaling_group_name() == Some(self.config.group_name.as_str()))
            .ok_or_else(|| CloudError::NotFound {
                what: format!("auto scaling group {}", self.config.group_name),
            })?;
        let mut attached: Vec<String> = group.target_group_arns().to_vec();
        for source in group.traffic_sources() {
            if source.r#type().is_none_or(|t| t == "elbv2")
                && let Some(arn) = source.identifier()
                && !attached.iter().any(|a| a == arn)
            {
                attached.push(arn.to_owned());
            }
        }
        let mut instances = Vec::with_capacity(group.instances().len());
        for i in group.instances() {
            let (Some(id), Some(state)) = (i.instance_id(), i.lifecycle_state()) else {
                continue;
            };
            instances.push(AwsInstance {
                id: InstanceId(id.to_owned()),
                lifecycle: AwsLifecycle::from_sdk(state),
                healthy: i
                    .health_status()
                    .is_none_or(|h| h.eq_ignore_ascii_case("healthy")),
                protected_from_scale_in: i.protected_from_scale_in().unwrap_or(false),
                availability_zone: i.availability_zone().map(str::to_owned),
                private_ip: None,
                launched_at: None,
            });
        }
        Ok(AwsGroup {
            desired: count(group.desired_capacity()),
            min: count(group.min_size()),
            max: count(group.max_size()),
            instances,
            attached_target_groups: attached,
        })
    }

    /// The group with each instance's private IP and launch time from EC2.
    ///
    /// Looks instances up with an `instance-id` filter rather than by id: by
    /// id, one instance EC2 does not list yet (it is eventually consistent
    /// with the group) fails the whole call with InvalidInstanceID.NotFound.
    pub async fn describe_group(&self) -> Result<AwsGroup, CloudError> {
        let mut group = self.describe_group_only().await?;
        let ids: Vec<String> = group.instances.iter().map(|i| i.id.0.clone()).collect();
        let mut found: HashMap<String, (Option<IpAddr>, Option<SystemTime>)> = HashMap::new();
        for chunk in ids.chunks(DESCRIBE_INSTANCES_CHUNK) {
            let mut next: Option<String> = None;
            loop {
                let out = self
                    .clients
                    .ec2
                    .describe_instances()
                    .filters(
                        Filter::builder()
                            .name("instance-id")
                            .set_values(Some(chunk.to_vec()))
                            .build(),
                    )
                    .set_next_token(next.take())
                    .send()
                    .await
                    .map_err(|e| error::provider("DescribeInstances", &e))?;
                for r in out.reservations() {
                    for i in r.instances() {
                        let Some(id) = i.instance_id() else { continue };
                        let ip = i.private_ip_address().and_then(|a| a.parse().ok());
                        let launched = i.launch_time().and_then(|t| SystemTime::try_from(*t).ok());
                        found.insert(id.to_owned(), (ip, launched));
                    }
                }
                match out.next_token() {
                    Some(t) if !t.is_empty() => next = Some(t.to_owned()),
                    _ => break,
                }
            }
        }
        for i in &mut group.instances {
            if let Some((ip, launched)) = found.get(&i.id.0) {
                i.private_ip = *ip;
                i.launched_at = *launched;
            }
        }
        // An instance the group has stopped listing is gone for good (ids are
        // never reused). Its decrement mark goes once the mark is old enough
        // that no stale read can list the instance in service again.
        let now = Instant::now();
        let mut guard = self.decremented.lock().expect("decrement guard poisoned");
        guard.retain(|id, marked| {
            group.instance(id).is_some() || now.duration_since(*marked) < DECREMENT_MARK_TTL
        });
        Ok(group)
    }

    /// True when the fleet's target group is attached to the group, which
    /// then registers and deregisters instances itself: the controller should
    /// warn once and skip registration (it would register engines before
    /// they are ready and always wait out the whole deregistration delay).
    pub async fn target_group_attached(&self) -> Result<bool, CloudError> {
        let group = self.describe_group_only().await?;
        Ok(group
            .attached_target_groups
            .iter()
            .any(|arn| arn == &self.config.target_group_arn))
    }

    /// Ends the lifecycle action holding `id` (`Pending:Wait` for the
    /// launching hook, `Terminating:Wait` for the terminating one).
    pub async fn complete_lifecycle_action(
        &self,
        id: &InstanceId,
        hook: LifecycleHook,
        result: LifecycleResult,
    ) -> Result<(), CloudError> {
        let hook_name = self.hook_name(hook)?;
        self.clients
            .autoscaling
            .complete_lifecycle_action()
            .auto_scaling_group_name(&self.config.group_name)
            .lifecycle_hook_name(hook_name)
            .instance_id(&id.0)
            .lifecycle_action_result(result.as_str())
            .send()
            .await
            .map_err(|e| error::provider("CompleteLifecycleAction", &e))?;
        info!(instance = %id, hook = hook_name, result = result.as_str(), "lifecycle action completed");
        Ok(())
    }

    /// Restarts the hook's heartbeat timeout for `id`: call it well inside
    /// that timeout while a drain takes long.
    pub async fn record_lifecycle_heartbeat(
        &self,
        id: &InstanceId,
        hook: LifecycleHook,
    ) -> Result<(), CloudError> {
        let hook_name = self.hook_name(hook)?;
        self.clients
            .autoscaling
            .record_lifecycle_action_heartbeat()
            .auto_scaling_group_name(&self.config.group_name)
            .lifecycle_hook_name(hook_name)
            .instance_id(&id.0)
            .send()
            .await
            .map_err(|e| error::provider("RecordLifecycleActionHeartbeat", &e))?;
        debug!(instance = %id, hook = hook_name, "lifecycle heartbeat recorded");
        Ok(())
    }

    /// Marks `id` unhealthy at once (no grace period), so the group replaces
    /// it: for an instance whose minion never joined.
    pub async fn set_unhealthy(&self, id: &InstanceId) -> Result<(), CloudError> {
        self.clients
            .autoscaling
            .set_instance_health()
            .instance_id(&id.0)
            .health_status("Unhealthy")
            .should_respect_grace_period(false)
            .send()
            .await
            .map_err(|e| error::provider("SetInstanceHealth", &e))?;
        info!(instance = %id, "instance marked unhealthy");
        Ok(())
    }

    /// Protects (or unprotects) instances from the group's own scale-ins, so
    /// those pick idle instances. Terminations by the controller ignore it.
    pub async fn set_scale_in_protection(
        &self,
        ids: &[InstanceId],
        protected: bool,
    ) -> Result<(), CloudError> {
        for chunk in ids.chunks(PROTECTION_CHUNK) {
            self.clients
                .autoscaling
                .set_instance_protection()
                .auto_scaling_group_name(&self.config.group_name)
                .set_instance_ids(Some(chunk.iter().map(|i| i.0.clone()).collect()))
                .protected_from_scale_in(protected)
                .send()
                .await
                .map_err(|e| error::provider("SetInstanceProtection", &e))?;
        }
        Ok(())
    }
}

#[async_trait]
impl CapacityGroup for AwsFleet {
    async fn describe(&self) -> Result<GroupState, CloudError> {
        Ok(self
            .describe_group()
            .await?
            .to_group_state(SystemTime::now()))
    }

    /// EC2's word (DescribeInstances): the instance's state is `running`.
    /// An instance EC2 does not list (yet) is not.
    async fn running(&self, id: &InstanceId) -> Result<bool, CloudError> {
        let out = self
            .clients
            .ec2
            .describe_instances()
            .filters(Filter::builder().name("instance-id").values(&id.0).build())
            .send()
            .await
            .map_err(|e| error::provider("DescribeInstances", &e))?;
        Ok(out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .filter(|i| i.instance_id() == Some(id.0.as_str()))
            .any(|i| {
                i.state().and_then(|s| s.name())
                    == Some(&aws_sdk_ec2::types::InstanceStateName::Running)
            }))
    }

    /// Checks the group's bounds first (AWS would refuse with a
    /// ValidationError; the controller wants `OutOfBounds` to explain a
    /// clip), and makes no call when the group already has that size.
    async fn set_desired(&self, desired: u32) -> Result<(), CloudError> {
        let group = self.describe_group_only().await?;
        if desired < group.min || desired > group.max {
            return Err(CloudError::OutOfBounds {
                desired,
                min: group.min,
                max: group.max,
            });
        }
        if desired == group.desired {
            return Ok(());
        }
        let value = i32::try_from(desired).map_err(|_| CloudError::OutOfBounds {
            desired,
            min: group.min,
            max: group.max,
        })?;
        self.clients
            .autoscaling
            .set_desired_capacity()
            .auto_scaling_group_name(&self.config.group_name)
            .desired_capacity(value)
            .honor_cooldown(false)
            .send()
            .await
            .map_err(|e| error::provider("SetDesiredCapacity", &e))?;
        info!(group = %self.config.group_name, from = group.desired, to = desired, "desired capacity set");
        Ok(())
    }

    /// Terminates `id`, lowering the desired capacity at most once for it.
    ///
    /// Why no second decrement can happen:
    /// 1. The group is asked first. An instance it no longer lists, or lists
    ///    as terminating, terminated or detaching, needs nothing: no call.
    /// 2. DescribeAutoScalingGroups is eventually consistent and may still
    ///    list the instance in service just after a terminate. So the fleet
    ///    remembers each instance a decrementing terminate may have reached
    ///    AWS for (taken under a lock before the call, so two concurrent
    ///    callers cannot both decrement), and any later call for it goes out
    ///    without decrement. The mark is dropped only when AWS certainly did
    ///    not apply the call (a 4xx answer); after a timeout or a 5xx it
    ///    stays, because the call may have been applied.
    /// 3. The SDK's retries are off for this call: a retry after a lost
    ///    answer would repeat a decrement AWS already applied.
    /// 4. If the group starts terminating the instance itself between our
    ///    look and our call, AWS either refuses ours or applies it; either
    ///    way it is the only decrement for that instance.
    ///
    /// The price: after an ambiguous failure the instance may be terminated
    /// without the decrement, so the group launches a replacement and the
    /// controller scales in once more. Too many instances for a while, never
    /// too few. Across controller restarts, point 1 holds and the
    /// controller's own persisted Terminating state keeps it from asking
    /// again.
    async fn terminate(&self, id: &InstanceId, decrement: bool) -> Result<(), CloudError> {
        let group = self.describe_group_only().await?;
        match group.instance(id) {
            None => {
                debug!(instance = %id, "not in the group: nothing to terminate");
                return Ok(());
            }
            Some(i) if i.lifecycle.is_leaving() => {
                debug!(instance = %id, lifecycle = ?i.lifecycle, "already leaving the group");
                return Ok(());
            }
            Some(_) => {}
        }
        let decrement = decrement
            && self
                .decremented
                .lock()
                .expect("decrement guard poisoned")
                .insert(id.clone(), Instant::now())
                .is_none();
        let sent = self
            .clients
            .autoscaling
            .terminate_instance_in_auto_scaling_group()
            .instance_id(&id.0)
            .should_decrement_desired_capacity(decrement)
            .customize()
            .config_override(
                aws_sdk_autoscaling::config::Builder::default()
                    .retry_config(RetryConfig::disabled()),
            )
            .send()
            .await;
        match sent {
            Ok(_) => {
                info!(instance = %id, decrement, "instance terminating");
                Ok(())
            }
            Err(e) => {
                let err = error::provider("TerminateInstanceInAutoScalingGroup", &e);
                if !error::certainly_not_applied(&e) {
                    return Err(err);
                }
                if decrement {
                    self.decremented
                        .lock()
                        .expect("decrement guard poisoned")
                        .remove(id);
                }
                Err(match err {
                    CloudError::Provider { call, message } => CloudError::Refused { call, message },
                    other => other,
                })
            }
        }
    }
}

/// The hooks the fleet's config names, its protection and its target
/// group's settings, for the controller.
#[async_trait]
impl GroupLifecycle for AwsFleet {
    async fn describe_hooked(&self) -> Result<HookedGroup, CloudError> {
        let g = self.describe_group().await?;
        // Only the hooks the config names: the controller cannot complete an
        // action for a hook it does not know, and the hook's own timeout
        // ends such a wait.
        let held = |hook, configured: &Option<String>| {
            if configured.is_none() {
                return Default::default();
            }
            g.awaiting(hook).map(|i| i.id.clone()).collect()
        };
        Ok(HookedGroup {
            pending_wait: held(LifecycleHook::Launching, &self.config.launching_hook),
            terminating_wait: held(LifecycleHook::Terminating, &self.config.terminating_hook),
            in_service: g
                .instances
                .iter()
                .filter(|i| i.lifecycle == AwsLifecycle::InService)
                .map(|i| i.id.clone())
                .collect(),
            protected: g
                .instances
                .iter()
                .filter(|i| i.protected_from_scale_in)
                .map(|i| i.id.clone())
                .collect(),
            group: g.to_group_state(SystemTime::now()),
        })
    }

    async fn target_group_setup(&self) -> Result<TargetGroupSetup, CloudError> {
        Ok(TargetGroupSetup {
            attached: self.target_group_attached().await?,
            deregistration_delay: self.deregistration_delay().await?,
        })
    }

    async fn complete_lifecycle_action(
        &self,
        id: &InstanceId,
        hook: LifecycleHook,
        result: LifecycleResult,
    ) -> Result<(), CloudError> {
        AwsFleet::complete_lifecycle_action(self, id, hook, result).await
    }

    async fn record_lifecycle_heartbeat(
        &self,
        id: &InstanceId,
        hook: LifecycleHook,
    ) -> Result<(), CloudError> {
        AwsFleet::record_lifecycle_heartbeat(self, id, hook).await
    }

    async fn set_unhealthy(&self, id: &InstanceId) -> Result<(), CloudError> {
        AwsFleet::set_unhealthy(self, id).await
    }

    async fn set_scale_in_protection(
        &self,
        ids: &[InstanceId],
        protected: bool,
    ) -> Result<(), CloudError> {
        AwsFleet::set_scale_in_protection(self, ids, protected).await
    }
}
