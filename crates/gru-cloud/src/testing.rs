//! A scripted fake of every provider trait, for the controller's scenario
//! tests (behind the `testing` feature): a group whose instances, hook wait
//! states and protection the test sets, a target group that answers at once,
//! and a log of every call, in order, for the test to read.
//!
//! It is not an emulation of AWS (moto is, for gru-aws's own tests): it does
//! exactly what the test scripts and records what the controller asked.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::{
    CapacityGroup, CloudError, GroupLifecycle, GroupState, HookedGroup, Instance, InstanceId,
    InstanceLifecycle, LifecycleHook, LifecycleResult, Target, TargetGroup, TargetGroupSetup,
    TargetState,
};

/// The scripted group, target group and lifecycle calls of one fleet.
pub struct ScriptedGroup {
    script: Mutex<Script>,
}

struct Script {
    group: GroupState,
    pending_wait: HashSet<InstanceId>,
    terminating_wait: HashSet<InstanceId>,
    protected: HashSet<InstanceId>,
    targets: HashMap<Target, TargetState>,
    /// Deregistered targets stay `Draining` (an NLB does for the whole
    /// deregistration delay) instead of going at once.
    keep_draining: bool,
    calls: Vec<String>,
}

impl ScriptedGroup {
    /// A group with these instances in service and as its desired capacity.
    pub fn new(ids: &[&str]) -> Arc<Self> {
        let instances = ids
            .iter()
            .map(|id| Instance {
                id: InstanceId::from(*id),
                lifecycle: InstanceLifecycle::InService,
                launched_at: SystemTime::UNIX_EPOCH,
            })
            .collect();
        Arc::new(ScriptedGroup {
            script: Mutex::new(Script {
                group: GroupState {
                    desired: u32::try_from(ids.len()).unwrap_or(u32::MAX),
                    min: 0,
                    max: 10,
                    instances,
                },
                pending_wait: HashSet::new(),
                terminating_wait: HashSet::new(),
                protected: HashSet::new(),
                targets: HashMap::new(),
                keep_draining: false,
                calls: Vec::new(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Script> {
        self.script.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every call so far, in order ("terminate i-1 decrement", …).
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    pub fn desired(&self) -> u32 {
        self.lock().group.desired
    }

    /// The group starts terminating `id` itself and its terminating hook
    /// holds it (what AWS does on a health replacement or a rebalance).
    pub fn hold_for_termination(&self, id: &str) {
        let mut s = self.lock();
        let id = InstanceId::from(id);
        if let Some(i) = s.group.instances.iter_mut().find(|i| i.id == id) {
            i.lifecycle = InstanceLifecycle::Terminating;
        }
        s.terminating_wait.insert(id);
    }

    /// From now on deregistered targets stay `Draining`, as an NLB's do for
    /// its whole deregistration delay.
    pub fn keep_targets_draining(&self) {
        self.lock().keep_draining = true;
    }

    fn log(&self, call: String) {
        self.lock().calls.push(call);
    }
}

#[async_trait]
impl CapacityGroup for ScriptedGroup {
    async fn describe(&self) -> Result<GroupState, CloudError> {
        Ok(self.lock().group.clone())
    }

    async fn set_desired(&self, desired: u32) -> Result<(), CloudError> {
        let mut s = self.lock();
        s.group.desired = desired;
        s.calls.push(format!("set desired {desired}"));
        Ok(())
    }

    async fn terminate(&self, id: &InstanceId, decrement: bool) -> Result<(), CloudError> {
        let mut s = self.lock();
        let before = s.group.instances.len();
        s.group.instances.retain(|i| &i.id != id);
        if s.group.instances.len() < before && decrement {
            s.group.desired = s.group.desired.saturating_sub(1);
        }
        s.calls.push(format!(
            "terminate {id}{}",
            if decrement { " decrement" } else { "" }
        ));
        Ok(())
    }
}

#[async_trait]
impl TargetGroup for ScriptedGroup {
    async fn register(&self, target: &Target) -> Result<(), CloudError> {
        let mut s = self.lock();
        s.targets.insert(target.clone(), TargetState::Healthy);
        s.calls.push(format!("register {}", target.instance));
        Ok(())
    }

    async fn deregister(&self, target: &Target) -> Result<(), CloudError> {
        let mut s = self.lock();
        if s.keep_draining {
            if let Some(state) = s.targets.get_mut(target) {
                *state = TargetState::Draining;
            }
        } else {
            // Nothing is connected through a scripted load balancer: gone at
            // once.
            s.targets.remove(target);
        }
        s.calls.push(format!("deregister {}", target.instance));
        Ok(())
    }

    async fn target_state(&self, target: &Target) -> Result<TargetState, CloudError> {
        Ok(self
            .lock()
            .targets
            .get(target)
            .copied()
            .unwrap_or(TargetState::Unused))
    }
}

#[async_trait]
impl GroupLifecycle for ScriptedGroup {
    async fn describe_hooked(&self) -> Result<HookedGroup, CloudError> {
        let s = self.lock();
        Ok(HookedGroup {
            group: s.group.clone(),
            pending_wait: s.pending_wait.clone(),
            terminating_wait: s.terminating_wait.clone(),
            in_service: s
                .group
                .instances
                .iter()
                .filter(|i| i.lifecycle == InstanceLifecycle::InService)
                .map(|i| i.id.clone())
                .collect(),
            protected: s.protected.clone(),
        })
    }

    async fn target_group_setup(&self) -> Result<TargetGroupSetup, CloudError> {
        Ok(TargetGroupSetup {
            attached: false,
            deregistration_delay: Duration::from_secs(300),
        })
    }

    async fn complete_lifecycle_action(
        &self,
        id: &InstanceId,
        hook: LifecycleHook,
        result: LifecycleResult,
    ) -> Result<(), CloudError> {
        let mut s = self.lock();
        match hook {
            LifecycleHook::Terminating => {
                s.terminating_wait.remove(id);
                s.group.instances.retain(|i| &i.id != id);
            }
            LifecycleHook::Launching => {
                s.pending_wait.remove(id);
            }
        }
        s.calls
            .push(format!("complete {hook:?} {id} {}", result.as_str()));
        Ok(())
    }

    async fn record_lifecycle_heartbeat(
        &self,
        id: &InstanceId,
        hook: LifecycleHook,
    ) -> Result<(), CloudError> {
        self.log(format!("heartbeat {hook:?} {id}"));
        Ok(())
    }

    async fn set_unhealthy(&self, id: &InstanceId) -> Result<(), CloudError> {
        self.log(format!("unhealthy {id}"));
        Ok(())
    }

    async fn set_scale_in_protection(
        &self,
        ids: &[InstanceId],
        protected: bool,
    ) -> Result<(), CloudError> {
        let mut s = self.lock();
        for id in ids {
            if protected {
                s.protected.insert(id.clone());
            } else {
                s.protected.remove(id);
            }
            s.calls.push(format!("protect {id} {protected}"));
        }
        Ok(())
    }
}
