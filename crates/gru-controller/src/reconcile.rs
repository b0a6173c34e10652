//! The reconcile loop: one task per fleet that brings the cloud in line with
//! the registry, and the registry in line with the cloud.
//!
//! A pass is idempotent: every action it takes is safe to repeat (register a
//! registered target, deregister a draining one), and a pass that fails half
//! way leaves minions in states the next pass continues from. Each pass
//! returns when it wants to run again, like kube-runtime's `Action::requeue`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use gru_cloud::{CapacityGroup, CloudError, TargetGroup, TargetState};
use gru_core::{LifecycleEvent, MinionState};
use tokio::sync::{Notify, broadcast};

use crate::config::{ControllerConfig, FleetConfig};
use crate::registry::{Action, Command, DrainPhase, Event, EventKind, Registry};

/// How soon a pass with work under way (a drain, a registration) runs again.
pub const BUSY_REQUEUE: Duration = Duration::from_millis(200);

/// A fleet's providers: how the controller reaches its group and load balancer.
#[derive(Clone)]
pub struct FleetRuntime {
    pub config: FleetConfig,
    pub group: Arc<dyn CapacityGroup>,
    pub targets: Arc<dyn TargetGroup>,
}

/// The controller's shared state, handed to every server and loop.
pub struct Controller {
    pub config: ControllerConfig,
    pub fleets: BTreeMap<String, FleetRuntime>,
    registry: Mutex<Registry>,
    pub events: broadcast::Sender<Event>,
    wake: BTreeMap<String, Arc<Notify>>,
    pub join_token: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("failed to describe the group of fleet {fleet}")]
    Describe {
        fleet: String,
        #[source]
        source: CloudError,
    },
}

impl Controller {
    pub fn new(
        config: ControllerConfig,
        fleets: Vec<FleetRuntime>,
        join_token: String,
    ) -> Arc<Self> {
        let (events, _) = broadcast::channel(1024);
        let registry = Registry::new(&config.fleets, events.clone());
        let wake = fleets
            .iter()
            .map(|f| (f.config.name.clone(), Arc::new(Notify::new())))
            .collect();
        let fleets = fleets
            .into_iter()
            .map(|f| (f.config.name.clone(), f))
            .collect();
        Arc::new(Controller {
            config,
            fleets,
            registry: Mutex::new(registry),
            events,
            wake,
            join_token,
        })
    }

    /// The registry. Never hold the guard across an `.await`.
    pub fn registry(&self) -> MutexGuard<'_, Registry> {
        // A panic while holding the lock would be a bug; the data is still
        // the best we have, so keep going with it.
        self.registry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Makes the fleet's loop run now instead of at its next tick.
    pub fn wake(&self, fleet: &str) {
        if let Some(n) = self.wake.get(fleet) {
            n.notify_one();
        }
    }

    /// Runs the fleet's loop until `shutdown` resolves.
    pub async fn run_fleet(
        self: Arc<Self>,
        fleet: String,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let Some(wake) = self.wake.get(&fleet).cloned() else {
            return;
        };
        tokio::pin!(shutdown);
        let span = tracing::info_span!("reconcile", fleet = %fleet);
        loop {
            let pass = tracing::Instrument::instrument(self.reconcile(&fleet), span.clone());
            let next = match pass.await {
                Ok(next) => next,
                Err(e) => {
                    let message = format!("reconcile failed: {}", error_chain(&e));
                    self.registry()
                        .emit(&fleet, None, EventKind::Warning, message);
                    self.config.eval_interval
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(next) => {}
                _ = wake.notified() => {}
                _ = &mut shutdown => return,
            }
        }
    }

    /// One pass over one fleet.
    pub async fn reconcile(&self, fleet: &str) -> Result<Duration, ReconcileError> {
        let Some(rt) = self.fleets.get(fleet) else {
            return Ok(self.config.eval_interval);
        };
        let group = rt
            .group
            .describe()
            .await
            .map_err(|source| ReconcileError::Describe {
                fleet: fleet.to_owned(),
                source,
            })?;
        let actions = {
            let mut reg = self.registry();
            let now = Instant::now();
            reg.sync(
                fleet,
                &group,
                self.config.lost_timeout,
                self.config.join_timeout,
                now,
            );
            reg.plan(fleet, self.config.drain_deadline, now)
        };
        for action in actions {
            if let Err(e) = self.act(rt, &action).await {
                let minion = match &action {
                    Action::Register { minion, .. }
                    | Action::Deregister { minion, .. }
                    | Action::Terminate { minion, .. } => minion.clone(),
                };
                self.registry()
                    .emit(fleet, Some(&minion), EventKind::Warning, error_chain(&e));
            }
        }
        // The wall clock, read here at the edge, for schedules in time zones.
        let wall = jiff::Timestamp::now();
        let grow_to = self.registry().decide(fleet, Instant::now(), wall);
        if let Some(n) = grow_to {
            match rt.group.set_desired(n).await {
                Ok(()) => self.registry().emit(
                    fleet,
                    None,
                    EventKind::Step,
                    format!("group desired capacity set to {n}"),
                ),
                Err(e) => self.registry().emit(
                    fleet,
                    None,
                    EventKind::Warning,
                    format!("failed to set desired capacity to {n}: {}", error_chain(&e)),
                ),
            }
        }
        let busy = self.registry().busy(fleet);
        Ok(if busy {
            BUSY_REQUEUE.min(self.config.eval_interval)
        } else {
            self.config.eval_interval
        })
    }

    async fn act(&self, rt: &FleetRuntime, action: &Action) -> Result<(), CloudError> {
        let fleet = rt.config.name.as_str();
        match action {
            Action::Register { minion, target } => {
                rt.targets.register(target).await?;
                let mut reg = self.registry();
                if let Some(m) = reg.minions.get_mut(minion) {
                    m.registered = true;
                }
                let reason = format!("registered {} in the load balancer", target.address);
                let _ = reg.transition(minion, LifecycleEvent::Registered, &reason, Instant::now());
            }
            Action::Deregister { minion, target } => {
                if let Some(target) = target {
                    rt.targets.deregister(target).await?;
                    let state = rt.targets.target_state(target).await?;
                    if !state.takes_no_new_connections() {
                        // Still getting new connections; look again next pass.
                        return Ok(());
                    }
                    let mut reg = self.registry();
                    if let Some(m) = reg.minions.get_mut(minion)
                        && m.lb_connections_at_deregistration.is_none()
                    {
                        m.lb_connections_at_deregistration = rt.targets.connections_total(target);
                        let msg = format!(
                            "deregistered from the load balancer: target {state:?}, no new connections"
                        );
                        reg.emit(fleet, Some(minion), EventKind::Step, msg);
                    }
                }
                self.start_flush(rt, minion, target.as_ref());
            }
            Action::Terminate {
                minion,
                instance,
                target,
                decrement,
            } => {
                if let Some(target) = target {
                    // Step 4: only once the load balancer is done with it.
                    rt.targets.deregister(target).await?;
                    let state = rt.targets.target_state(target).await?;
                    if state != TargetState::Unused {
                        return Ok(());
                    }
                }
                rt.group.terminate(instance, *decrement).await?;
                let reason = if *decrement {
                    format!("terminating {instance}, desired capacity decremented")
                } else {
                    format!("terminating {instance} to be replaced")
                };
                let _ = self.registry().transition(
                    minion,
                    LifecycleEvent::TerminateIssued,
                    &reason,
                    Instant::now(),
                );
            }
        }
        Ok(())
    }

    /// Sends the Drain command once the load balancer sends no new connections.
    fn start_flush(&self, rt: &FleetRuntime, minion: &str, target: Option<&gru_cloud::Target>) {
        let fleet = rt.config.name.as_str();
        let deadline = self.config.drain_deadline;
        let now = Instant::now();
        let mut reg = self.registry();
        let Some(m) = reg.minions.get_mut(minion) else {
            return;
        };
        let Some(plan) = m.drain.as_mut() else { return };
        if plan.phase != DrainPhase::Deregistering {
            return;
        }
        let reason = plan.reason.clone();
        match &m.session {
            Some(link) => {
                let cmd = Command::Drain { deadline, reason };
                if link.tx.try_send(Ok(cmd)).is_err() {
                    // Session gone or full: try again next pass.
                    return;
                }
                plan.phase = DrainPhase::Flushing { since: now };
                m.lb_connections_at_drain_start =
                    target.and_then(|t| rt.targets.connections_total(t));
                reg.emit(
                    fleet,
                    Some(minion),
                    EventKind::Step,
                    "drain command sent".to_owned(),
                );
            }
            None if m.state == MinionState::Draining && m.session_token.is_none() => {
                // Never joined: there is no engine and so nothing to drain.
                plan.phase = DrainPhase::Flushing { since: now };
                let _ = reg.transition(
                    minion,
                    LifecycleEvent::Drained,
                    "never joined: nothing to drain",
                    now,
                );
            }
            None => {}
        }
    }
}

/// `{:#}`-style: each cause once, separated by ": ".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
