//! [`fence_fleet`]: a fleet's providers, every call that changes the cloud
//! made only while this controller leads, and only after its intent was
//! written under the lease.
//!
//! A deposed leader (paused past its lease, cut off from the table) learns
//! it at the latest here: [`Lease::may_act`] is false once its lease could
//! have been taken, and the intent write is fenced on its term. Calls that
//! only read pass through.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use gru_cloud::{
    CapacityGroup, CloudError, GroupLifecycle, GroupState, HookedGroup, InstanceId, LifecycleHook,
    LifecycleResult, Target, TargetGroup, TargetGroupSetup, TargetState,
};
use gru_controller::FleetRuntime;

use super::{DynamoStore, Lease};

/// `runtime`'s providers behind the lease (see the module doc).
pub fn fence_fleet(
    runtime: FleetRuntime,
    lease: Arc<Lease>,
    store: Arc<DynamoStore>,
) -> FleetRuntime {
    let guard = Arc::new(Guard {
        fleet: runtime.config.name.clone(),
        lease,
        store,
    });
    FleetRuntime {
        group: Arc::new(Fenced {
            inner: runtime.group,
            guard: guard.clone(),
        }),
        targets: Arc::new(Fenced {
            inner: runtime.targets,
            guard: guard.clone(),
        }),
        hooks: runtime.hooks.map(|h| {
            Arc::new(Fenced {
                inner: h,
                guard: guard.clone(),
            }) as Arc<dyn GroupLifecycle>
        }),
        ..runtime
    }
}

struct Guard {
    fleet: String,
    lease: Arc<Lease>,
    store: Arc<DynamoStore>,
}

impl Guard {
    /// Ok when the call described by `what` may go out: this controller
    /// leads, and its intent is in the table under its term.
    async fn allow(&self, call: &'static str, what: String) -> Result<(), CloudError> {
        let refused = |why: String| {
            tracing::warn!(fleet = %self.fleet, call, "not calling: {why}");
            CloudError::Refused { call, message: why }
        };
        if !self.lease.may_act() {
            return Err(refused(
                "this controller does not hold the leader lease".to_owned(),
            ));
        }
        let at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        self.store
            .record_intent(&self.fleet, &what, at_ms)
            .await
            .map_err(|e| {
                refused(format!(
                    "its intent could not be written under the lease: {e}"
                ))
            })?;
        // The write may have taken a while: ask again.
        if !self.lease.may_act() {
            return Err(refused(
                "this controller does not hold the leader lease".to_owned(),
            ));
        }
        Ok(())
    }
}

struct Fenced<T: ?Sized> {
    inner: Arc<T>,
    guard: Arc<Guard>,
}

#[async_trait]
impl CapacityGroup for Fenced<dyn CapacityGroup> {
    async fn describe(&self) -> Result<GroupState, CloudError> {
        self.inner.describe().await
    }
    async fn set_desired(&self, desired: u32) -> Result<(), CloudError> {
        self.guard
            .allow("set_desired", format!("set desired capacity to {desired}"))
            .await?;
        self.inner.set_desired(desired).await
    }
    async fn terminate(&self, id: &InstanceId, decrement: bool) -> Result<(), CloudError> {
        self.guard
            .allow(
                "terminate",
                format!("terminate {id} (decrement: {decrement})"),
            )
            .await?;
        self.inner.terminate(id, decrement).await
    }
    async fn running(&self, id: &InstanceId) -> Result<bool, CloudError> {
        self.inner.running(id).await
    }
}

#[async_trait]
impl TargetGroup for Fenced<dyn TargetGroup> {
    async fn register(&self, target: &Target) -> Result<(), CloudError> {
        self.guard
            .allow("register", format!("register {}", target.instance))
            .await?;
        self.inner.register(target).await
    }
    async fn deregister(&self, target: &Target) -> Result<(), CloudError> {
        self.guard
            .allow("deregister", format!("deregister {}", target.instance))
            .await?;
        self.inner.deregister(target).await
    }
    async fn target_state(&self, target: &Target) -> Result<TargetState, CloudError> {
        self.inner.target_state(target).await
    }
    fn connections_total(&self, target: &Target) -> Option<u64> {
        self.inner.connections_total(target)
    }
}

#[async_trait]
impl GroupLifecycle for Fenced<dyn GroupLifecycle> {
    async fn describe_hooked(&self) -> Result<HookedGroup, CloudError> {
        self.inner.describe_hooked().await
    }
    async fn target_group_setup(&self) -> Result<TargetGroupSetup, CloudError> {
        self.inner.target_group_setup().await
    }
    async fn complete_lifecycle_action(
        &self,
        id: &InstanceId,
        hook: LifecycleHook,
        result: LifecycleResult,
    ) -> Result<(), CloudError> {
        self.guard
            .allow(
                "complete_lifecycle_action",
                format!("complete {hook:?} hook of {id} with {}", result.as_str()),
            )
            .await?;
        self.inner.complete_lifecycle_action(id, hook, result).await
    }
    async fn record_lifecycle_heartbeat(
        &self,
        id: &InstanceId,
        hook: LifecycleHook,
    ) -> Result<(), CloudError> {
        self.guard
            .allow(
                "record_lifecycle_heartbeat",
                format!("heartbeat {hook:?} hook of {id}"),
            )
            .await?;
        self.inner.record_lifecycle_heartbeat(id, hook).await
    }
    async fn set_unhealthy(&self, id: &InstanceId) -> Result<(), CloudError> {
        self.guard
            .allow("set_unhealthy", format!("set {id} unhealthy"))
            .await?;
        self.inner.set_unhealthy(id).await
    }
    async fn set_scale_in_protection(
        &self,
        ids: &[InstanceId],
        protected: bool,
    ) -> Result<(), CloudError> {
        self.guard
            .allow(
                "set_scale_in_protection",
                format!(
                    "scale-in protection {protected} for {} instance(s)",
                    ids.len()
                ),
            )
            .await?;
        self.inner.set_scale_in_protection(ids, protected).await
    }
}
