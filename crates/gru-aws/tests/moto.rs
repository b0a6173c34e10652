//! gru-aws against moto's server, a third-party emulation of the AWS APIs.
//!
//! One moto server serves the whole test binary, on a free loopback port.
//! Each test is its own AWS account (a random 12-digit `x-moto-account-id`
//! header added by an SDK interceptor), so tests run in parallel without
//! seeing each other. The SDK's retries are off: moto answers 500 to what it
//! does not implement, and a retry would only hide that.
//!
//! The server, the launcher that adds lifecycle hooks to moto 5.2.5, the
//! account interceptor and the fleet set-up live in `gru_aws::testing` (the
//! `testing` feature), shared with the gru crate's end-to-end tests.
//!
//! What moto 5.2.5 does not do, and how each test copes, is said where it
//! matters (DESIGN.md lists the gaps).
//!
//! The tests after the provider's own run the whole controller over moto
//! (module `scenario`): scale out, scale in, terminations the group starts,
//! the launching hook, instances that never join, an attached target group
//! and a terminate whose answer is lost.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use aws_sdk_autoscaling::config::interceptors::{
    BeforeDeserializationInterceptorContextRef, BeforeTransmitInterceptorContextRef,
};
use aws_sdk_autoscaling::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_autoscaling::error::BoxError;
use aws_sdk_elasticloadbalancingv2::types::{TargetDescription, TargetGroupAttribute};
use gru_aws::testing::{self, ENGINE_PORT, MotoFleet, MotoServer, ZONE, random_account};
use gru_aws::{AwsClients, AwsFleet, AwsFleetConfig, AwsLifecycle, LifecycleHook, LifecycleResult};
use gru_cloud::SignalSource;
use gru_cloud::{
    CapacityGroup, CloudError, InstanceId, InstanceLifecycle, Target, TargetGroup, TargetState,
};
use gru_core::{DrainPhase, MinionState};
use scenario::{SCENARIO_TIMEOUT, is_step, is_transition_to, messages, pin_at, position, until};

#[path = "moto/dynamo_store.rs"]
mod dynamo_store;
#[path = "moto/lease.rs"]
mod lease;

/// Bound on every test: moto's first EC2 call in an account takes ≈ 2 s.
const TEST_TIMEOUT: Duration = Duration::from_secs(90);

/// The moto server of this test binary (module `gru_aws::testing`).
fn moto() -> &'static MotoServer {
    static MOTO: OnceLock<MotoServer> = OnceLock::new();
    MOTO.get_or_init(MotoServer::start)
}

/// Loses the answers of the next `armed` TerminateInstanceInAutoScalingGroup
/// calls: the request reaches moto, which applies it, and the caller gets an
/// error instead of the answer (a timeout or a dropped connection on AWS).
/// Fault injection on the client side; moto itself is unchanged.
#[derive(Clone, Debug, Default)]
struct LostAnswers {
    armed: Arc<AtomicU32>,
    losing: Arc<AtomicBool>,
}

impl Intercept for LostAnswers {
    fn name(&self) -> &'static str {
        "LostAnswers"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let terminate = context.request().body().bytes().is_some_and(|b| {
            String::from_utf8_lossy(b).contains("Action=TerminateInstanceInAutoScalingGroup")
        });
        if terminate
            && self
                .armed
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            self.losing.store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    fn read_after_transmit(
        &self,
        _: &BeforeDeserializationInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if self.losing.swap(false, Ordering::SeqCst) {
            return Err("the answer was lost on the way back (injected)".into());
        }
        Ok(())
    }
}

/// SDK clients for moto account `account` (static credentials, retries
/// off), with `faults` on every call.
fn clients_in(url: &str, account: &str, faults: LostAnswers) -> AwsClients {
    testing::clients(url, account, faults)
}

/// A fleet in a fresh account: a VPC and subnet, a launch template with a
/// Linux AMI, a target group and an Auto Scaling group (not attached).
struct Fixture {
    fleet: AwsFleet,
    /// The moto account every client of this fixture talks to.
    account: String,
    clients: AwsClients,
    group: String,
    target_group_arn: String,
}

async fn fixture(min: i32, max: i32, desired: i32) -> Fixture {
    fixture_with(min, max, desired, |_| {}).await
}

async fn fixture_with(
    min: i32,
    max: i32,
    desired: i32,
    tweak: impl FnOnce(&mut AwsFleetConfig),
) -> Fixture {
    let account = random_account();
    let clients = clients_in(&moto().url, &account, LostAnswers::default());
    let MotoFleet {
        group,
        target_group_arn,
    } = testing::create_fleet(&clients, min, max, desired).await;
    let mut config = AwsFleetConfig::new(&group, &target_group_arn);
    config.endpoint_url = Some(moto().url.clone());
    tweak(&mut config);
    Fixture {
        fleet: AwsFleet::from_clients(config, clients.clone()),
        clients,
        group,
        target_group_arn,
        account,
    }
}

impl Fixture {
    /// The group's desired capacity as moto reports it, asked directly.
    async fn desired(&self) -> i32 {
        self.clients
            .autoscaling
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(&self.group)
            .send()
            .await
            .expect("DescribeAutoScalingGroups")
            .auto_scaling_groups()[0]
            .desired_capacity()
            .expect("a desired capacity")
    }

    async fn in_service(&self) -> Vec<InstanceId> {
        let state = self.fleet.describe().await.expect("describe");
        state
            .instances
            .into_iter()
            .filter(|i| i.lifecycle == InstanceLifecycle::InService)
            .map(|i| i.id)
            .collect()
    }
}

fn target(id: &InstanceId) -> Target {
    Target {
        instance: id.clone(),
        address: SocketAddr::from(([10, 0, 1, 10], ENGINE_PORT)),
    }
}

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("test ran past its time bound")
}

#[tokio::test]
async fn describe_reports_bounds_and_instances_with_ec2_details() {
    bounded(async {
        let fx = fixture(0, 4, 2).await;
        let group = fx.fleet.describe_group().await.unwrap();
        assert_eq!((group.desired, group.min, group.max), (2, 0, 4));
        assert_eq!(group.instances.len(), 2);
        for i in &group.instances {
            assert_eq!(i.lifecycle, AwsLifecycle::InService);
            assert!(i.healthy);
            assert!(!i.protected_from_scale_in);
            assert_eq!(i.availability_zone.as_deref(), Some(ZONE));
            let ip = i.private_ip.expect("moto gives each instance a private IP");
            assert!(
                ip.to_string().starts_with("10.0.1."),
                "{ip} is in the subnet"
            );
            assert!(i.launched_at.is_some());
        }
        let state = fx.fleet.describe().await.unwrap();
        assert_eq!(state.instances.len(), 2);
        assert!(
            state
                .instances
                .iter()
                .all(|i| i.lifecycle == InstanceLifecycle::InService)
        );
    })
    .await;
}

#[tokio::test]
async fn an_instance_is_running_until_ec2_stops_it() {
    bounded(async {
        let fx = fixture(0, 4, 2).await;
        let group = fx.fleet.describe_group().await.unwrap();
        let (a, b) = (group.instances[0].id.clone(), group.instances[1].id.clone());
        assert!(fx.fleet.running(&a).await.unwrap());
        fx.clients
            .ec2
            .stop_instances()
            .instance_ids(&a.0)
            .send()
            .await
            .expect("StopInstances");
        assert!(!fx.fleet.running(&a).await.unwrap(), "stopped");
        assert!(fx.fleet.running(&b).await.unwrap(), "the other still runs");
        assert!(
            !fx.fleet
                .running(&InstanceId::from("i-0000000000000dead"))
                .await
                .unwrap(),
            "an instance EC2 does not know"
        );
    })
    .await;
}

#[tokio::test]
async fn set_desired_scales_out_and_back_and_refuses_to_leave_the_bounds() {
    bounded(async {
        let fx = fixture(0, 4, 0).await;
        fx.fleet.set_desired(3).await.unwrap();
        assert_eq!(fx.desired().await, 3);
        assert_eq!(fx.in_service().await.len(), 3);
        // Same size again: no change, no error.
        fx.fleet.set_desired(3).await.unwrap();

        // moto would accept 5 (it does not check the bounds; AWS does): the
        // provider checks first and makes no call.
        match fx.fleet.set_desired(5).await {
            Err(CloudError::OutOfBounds {
                desired: 5,
                min: 0,
                max: 4,
            }) => {}
            other => panic!("expected OutOfBounds, got {other:?}"),
        }
        assert_eq!(fx.desired().await, 3);

        fx.fleet.set_desired(0).await.unwrap();
        assert_eq!(fx.desired().await, 0);
        assert!(fx.in_service().await.is_empty());
    })
    .await;
}

#[tokio::test]
async fn terminate_with_decrement_lowers_desired_exactly_once() {
    bounded(async {
        let fx = fixture(0, 5, 3).await;
        let victims = fx.in_service().await;
        let victim = &victims[0];

        fx.fleet.terminate(victim, true).await.unwrap();
        assert_eq!(fx.desired().await, 2);
        // Again: the instance is gone (moto removes it at once; AWS would
        // show it Terminating first). No call, no second decrement.
        fx.fleet.terminate(victim, true).await.unwrap();
        assert_eq!(fx.desired().await, 2);
        let left = fx.in_service().await;
        assert_eq!(left.len(), 2);
        assert!(!left.contains(victim));

        // Without decrement the group replaces the instance.
        let last = left[1].clone();
        fx.fleet.terminate(&last, false).await.unwrap();
        assert_eq!(fx.desired().await, 2);
        let replaced = fx.in_service().await;
        assert_eq!(replaced.len(), 2);
        assert!(!replaced.contains(&last));

        // An instance the group never had: nothing to do.
        fx.fleet
            .terminate(&InstanceId::from("i-0123456789abcdef0"), true)
            .await
            .unwrap();
        assert_eq!(fx.desired().await, 2);

        // Two concurrent calls for one instance: both may see it in service;
        // only the one that takes the mark may decrement, the other goes out
        // without. Whichever reaches moto second finds the instance gone
        // (moto answers 500; AWS a ValidationError). If the undecremented one
        // wins, the group replaces the instance and desired stays: one
        // instance too many for a while, never a second decrement.
        let other = &replaced[0];
        let (a, b) = tokio::join!(
            fx.fleet.terminate(other, true),
            fx.fleet.terminate(other, true)
        );
        assert!(a.is_ok() || b.is_ok(), "{a:?} {b:?}");
        let desired = fx.desired().await;
        assert!(desired == 1 || desired == 2, "desired {desired}");
        assert!(!fx.in_service().await.contains(other));
    })
    .await;
}

#[tokio::test]
async fn register_and_deregister_move_the_target_state() {
    bounded(async {
        let fx = fixture(0, 2, 1).await;
        let id = fx.in_service().await.remove(0);
        let t = target(&id);
        assert_eq!(
            fx.fleet.target_state(&t).await.unwrap(),
            TargetState::Unused
        );

        fx.fleet.register(&t).await.unwrap();
        fx.fleet.register(&t).await.unwrap();
        // moto's targets are healthy at once (AWS shows `initial` while the
        // first health checks run).
        assert_eq!(
            fx.fleet.target_state(&t).await.unwrap(),
            TargetState::Healthy
        );
        let registered = fx
            .clients
            .elb
            .describe_target_health()
            .target_group_arn(&fx.target_group_arn)
            .send()
            .await
            .unwrap();
        let listed: Vec<(Option<&str>, Option<i32>)> = registered
            .target_health_descriptions()
            .iter()
            .filter_map(|d| d.target())
            .map(|t: &TargetDescription| (t.id(), t.port()))
            .collect();
        assert_eq!(
            listed,
            vec![(Some(id.0.as_str()), Some(i32::from(ENGINE_PORT)))]
        );

        fx.fleet.deregister(&t).await.unwrap();
        // moto has no `draining`: a deregistered target is `unused` at once,
        // whatever the deregistration delay. On AWS the controller sees
        // Draining first; both take no new connections.
        let after = fx.fleet.target_state(&t).await.unwrap();
        assert_eq!(after, TargetState::Unused);
        assert!(after.takes_no_new_connections());
        fx.fleet.deregister(&t).await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn the_deregistration_delay_comes_from_the_target_groups_attributes() {
    bounded(async {
        let fx = fixture(0, 1, 0).await;
        assert_eq!(
            fx.fleet.deregistration_delay().await.unwrap(),
            Duration::from_secs(300)
        );
        fx.clients
            .elb
            .modify_target_group_attributes()
            .target_group_arn(&fx.target_group_arn)
            .attributes(
                TargetGroupAttribute::builder()
                    .key("deregistration_delay.timeout_seconds")
                    .value("42")
                    .build(),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(
            fx.fleet.deregistration_delay().await.unwrap(),
            Duration::from_secs(42)
        );
    })
    .await;
}

#[tokio::test]
async fn an_attached_target_group_is_detected() {
    bounded(async {
        let fx = fixture(0, 1, 0).await;
        assert!(!fx.fleet.target_group_attached().await.unwrap());
        fx.clients
            .autoscaling
            .attach_load_balancer_target_groups()
            .auto_scaling_group_name(&fx.group)
            .target_group_arns(&fx.target_group_arn)
            .send()
            .await
            .unwrap();
        assert!(fx.fleet.target_group_attached().await.unwrap());
    })
    .await;
}

#[tokio::test]
async fn protection_and_health_are_set_per_instance() {
    bounded(async {
        let fx = fixture(0, 3, 2).await;
        let ids = fx.in_service().await;
        fx.fleet
            .set_scale_in_protection(&ids[..1], true)
            .await
            .unwrap();
        let group = fx.fleet.describe_group().await.unwrap();
        assert!(group.instance(&ids[0]).unwrap().protected_from_scale_in);
        assert!(!group.instance(&ids[1]).unwrap().protected_from_scale_in);
        fx.fleet.set_scale_in_protection(&ids, false).await.unwrap();
        let group = fx.fleet.describe_group().await.unwrap();
        assert!(group.instances.iter().all(|i| !i.protected_from_scale_in));

        fx.fleet.set_unhealthy(&ids[1]).await.unwrap();
        let group = fx.fleet.describe_group().await.unwrap();
        // moto records the verdict but does not replace the instance (AWS
        // would terminate and replace it).
        assert!(!group.instance(&ids[1]).unwrap().healthy);
        assert!(group.instance(&ids[0]).unwrap().healthy);
    })
    .await;
}

#[tokio::test]
async fn a_missing_group_or_target_group_is_not_found() {
    bounded(async {
        let fx = fixture(0, 1, 0).await;
        let mut config = fx.fleet.config().clone();
        config.group_name = "no-such-group".into();
        let fleet = AwsFleet::from_clients(config, fx.clients.clone());
        assert!(matches!(
            fleet.describe().await,
            Err(CloudError::NotFound { .. })
        ));
        assert!(matches!(
            fleet.set_desired(1).await,
            Err(CloudError::NotFound { .. })
        ));

        let mut config = fx.fleet.config().clone();
        config.target_group_arn = fx.target_group_arn.replace("gru-hl7", "nope");
        let fleet = AwsFleet::from_clients(config, fx.clients.clone());
        let t = target(&InstanceId::from("i-0123456789abcdef0"));
        match fleet.register(&t).await {
            Err(CloudError::NotFound { what }) => assert!(what.contains("nope"), "{what}"),
            other => panic!("expected NotFound, got {other:?}"),
        }
    })
    .await;
}

#[tokio::test]
async fn lifecycle_actions_need_a_configured_hook() {
    bounded(async {
        let fx = fixture(0, 1, 1).await;
        let id = fx.in_service().await.remove(0);
        let err = fx
            .fleet
            .complete_lifecycle_action(&id, LifecycleHook::Terminating, LifecycleResult::Continue)
            .await
            .unwrap_err();
        assert!(matches!(err, CloudError::NotFound { .. }), "{err:?}");
        let err = fx
            .fleet
            .record_lifecycle_heartbeat(&id, LifecycleHook::Launching)
            .await
            .unwrap_err();
        assert!(matches!(err, CloudError::NotFound { .. }), "{err:?}");
    })
    .await;
}

impl Fixture {
    /// Puts the fleet's configured lifecycle hooks on the group.
    async fn put_hooks(&self) {
        let config = self.fleet.config();
        for (name, transition) in [
            (&config.launching_hook, "autoscaling:EC2_INSTANCE_LAUNCHING"),
            (
                &config.terminating_hook,
                "autoscaling:EC2_INSTANCE_TERMINATING",
            ),
        ] {
            let Some(name) = name else { continue };
            self.clients
                .autoscaling
                .put_lifecycle_hook()
                .auto_scaling_group_name(&self.group)
                .lifecycle_hook_name(name)
                .lifecycle_transition(transition)
                .heartbeat_timeout(300)
                .default_result("ABANDON")
                .send()
                .await
                .expect("PutLifecycleHook");
        }
    }
}

fn launching_hook(c: &mut AwsFleetConfig) {
    c.launching_hook = Some("gru-launching".into());
}

fn terminating_hook(c: &mut AwsFleetConfig) {
    c.terminating_hook = Some("gru-terminating".into());
}

fn ids<'a>(instances: impl Iterator<Item = &'a gru_aws::AwsInstance>) -> Vec<InstanceId> {
    instances.map(|i| i.id.clone()).collect()
}

// The lifecycle tests rely on the harness's layer over moto (LAUNCHER):
// moto itself stores hooks but never holds an instance.

#[tokio::test]
async fn a_launching_hook_holds_new_instances_until_the_controller_completes_it() {
    bounded(async {
        let fx = fixture_with(0, 3, 0, launching_hook).await;
        fx.put_hooks().await;
        fx.fleet.set_desired(2).await.unwrap();

        let group = fx.fleet.describe_group().await.unwrap();
        let held = ids(group.awaiting(LifecycleHook::Launching));
        assert_eq!(held.len(), 2);
        let state = group.to_group_state(std::time::SystemTime::now());
        assert!(
            state
                .instances
                .iter()
                .all(|i| i.lifecycle == InstanceLifecycle::Pending)
        );

        fx.fleet
            .record_lifecycle_heartbeat(&held[0], LifecycleHook::Launching)
            .await
            .unwrap();
        fx.fleet
            .complete_lifecycle_action(
                &held[0],
                LifecycleHook::Launching,
                LifecycleResult::Continue,
            )
            .await
            .unwrap();
        // ABANDON: the instance goes and the group launches a replacement,
        // which waits in its turn.
        fx.fleet
            .complete_lifecycle_action(&held[1], LifecycleHook::Launching, LifecycleResult::Abandon)
            .await
            .unwrap();

        let group = fx.fleet.describe_group().await.unwrap();
        assert_eq!(group.desired, 2);
        assert_eq!(
            group.instance(&held[0]).unwrap().lifecycle,
            AwsLifecycle::InService
        );
        assert!(group.instance(&held[1]).is_none());
        let replacement = ids(group.awaiting(LifecycleHook::Launching));
        assert_eq!(replacement.len(), 1);
        assert!(!held.contains(&replacement[0]));

        // No action holds an instance in service: AWS says ValidationError,
        // and the provider passes the code on.
        match fx
            .fleet
            .complete_lifecycle_action(
                &held[0],
                LifecycleHook::Launching,
                LifecycleResult::Continue,
            )
            .await
        {
            Err(CloudError::Provider {
                call: "CompleteLifecycleAction",
                message,
            }) => {
                assert!(message.starts_with("ValidationError"), "{message}");
            }
            other => panic!("expected a ValidationError, got {other:?}"),
        }
    })
    .await;
}

#[tokio::test]
async fn a_termination_the_group_started_waits_for_the_controller() {
    bounded(async {
        let fx = fixture_with(0, 3, 0, terminating_hook).await;
        fx.put_hooks().await;
        fx.fleet.set_desired(2).await.unwrap();
        let before = fx.in_service().await;

        // Someone (a health check, a rebalance) terminates an instance
        // without lowering the desired capacity.
        fx.clients
            .autoscaling
            .terminate_instance_in_auto_scaling_group()
            .instance_id(&before[0].0)
            .should_decrement_desired_capacity(false)
            .send()
            .await
            .unwrap();

        let group = fx.fleet.describe_group().await.unwrap();
        assert_eq!(
            ids(group.awaiting(LifecycleHook::Terminating)),
            vec![before[0].clone()]
        );
        let state = group.to_group_state(std::time::SystemTime::now());
        let victim = state.instances.iter().find(|i| i.id == before[0]).unwrap();
        assert_eq!(victim.lifecycle, InstanceLifecycle::Terminating);
        assert_eq!(
            fx.in_service().await.len(),
            2,
            "the group launched a replacement"
        );

        // The controller's own terminate must not decrement for it.
        fx.fleet.terminate(&before[0], true).await.unwrap();
        assert_eq!(fx.desired().await, 2);

        fx.fleet
            .record_lifecycle_heartbeat(&before[0], LifecycleHook::Terminating)
            .await
            .unwrap();
        fx.fleet
            .complete_lifecycle_action(
                &before[0],
                LifecycleHook::Terminating,
                LifecycleResult::Continue,
            )
            .await
            .unwrap();
        let group = fx.fleet.describe_group().await.unwrap();
        assert!(group.instance(&before[0]).is_none());
        assert_eq!(group.desired, 2);
        assert_eq!(group.instances.len(), 2);
    })
    .await;
}

#[tokio::test]
async fn terminate_under_a_terminating_hook_decrements_once_and_waits() {
    bounded(async {
        let fx = fixture_with(0, 3, 0, terminating_hook).await;
        fx.put_hooks().await;
        fx.fleet.set_desired(3).await.unwrap();
        let victim = fx.in_service().await.remove(0);

        // Unlike plain moto, the instance stays listed (Terminating:Wait), as
        // on AWS: the second call sees it leaving and does nothing.
        fx.fleet.terminate(&victim, true).await.unwrap();
        fx.fleet.terminate(&victim, true).await.unwrap();
        assert_eq!(fx.desired().await, 2);
        let group = fx.fleet.describe_group().await.unwrap();
        assert_eq!(
            group.instance(&victim).unwrap().lifecycle,
            AwsLifecycle::TerminatingWait
        );
        assert_eq!(
            group.instances.len(),
            3,
            "no replacement for a decremented termination"
        );

        fx.fleet
            .complete_lifecycle_action(
                &victim,
                LifecycleHook::Terminating,
                LifecycleResult::Continue,
            )
            .await
            .unwrap();
        fx.fleet.terminate(&victim, true).await.unwrap();
        assert_eq!(fx.desired().await, 2);
        assert_eq!(fx.in_service().await.len(), 2);
    })
    .await;
}

// The controller over moto: a real controller (its gRPC server on loopback
// with the dev PKI, its reconcile loop) drives this crate against moto, and
// real agents join it. The agents run in this process through
// `gru_minion::run`, the same code `gru minion` runs (real engine, real
// Session over loopback gRPC with TLS, a real MLLP sink downstream): the
// `gru` binary is only built for the gru crate's own tests, and an agent per
// instance in-process starts in milliseconds. Their instance ids come from
// moto, injected as `gru minion --instance-id` would.
//
// The controller talks to moto through the fixture's clients (the account
// interceptor, retries off); its config still carries the `[fleet.aws]`
// table an operator would write, so the parsing is the real one.

mod scenario {
    use std::collections::HashSet;
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use gru_aws::{AwsFleet, AwsLifecycle};
    use gru_cloud::InstanceId;
    use gru_controller::pki::DevPki;
    use gru_controller::registry::{Event, EventKind};
    use gru_controller::{Controller, ControllerConfig, FleetRuntime};
    use gru_core::MinionState;
    use gru_core::policy::Pin;
    use tokio::net::TcpListener;

    use super::{Fixture, LostAnswers};

    /// Bound on each scenario: moto's first calls in an account, joins,
    /// drains and a few reconcile passes.
    pub const SCENARIO_TIMEOUT: Duration = Duration::from_secs(120);
    pub const FLEET: &str = "hl7";
    const TOKEN: &str = "scenario-join-token";
    const POLL: Duration = Duration::from_millis(100);

    pub struct Scenario {
        pub fx: Fixture,
        pub controller: Arc<Controller>,
        agents: Agents,
        _stop: tokio::sync::oneshot::Sender<()>,
        _dir: tempfile::TempDir,
    }

    /// Starts `gru minion` agents in-process, at most one per instance id.
    #[derive(Clone)]
    struct Agents {
        controller: SocketAddr,
        sink: SocketAddr,
        dir: PathBuf,
        started: Arc<Mutex<HashSet<InstanceId>>>,
    }

    impl Agents {
        fn start(&self, id: &InstanceId) {
            if !self.started.lock().expect("lock").insert(id.clone()) {
                return;
            }
            let text = format!(
                "controller = \"https://{}\"\nca_file = \"ca.pem\"\nfleet = \"{FLEET}\"\n\
                 join_token_file = \"token\"\nstop_grace = \"1s\"\n\
                 [engine]\nlisten = \"127.0.0.1:0\"\ndownstream = \"{}\"\n",
                self.controller, self.sink
            );
            let config = gru_minion::MinionConfig::parse(&self.dir.join("minion.toml"), &text)
                .expect("minion config");
            tokio::spawn(gru_minion::run(
                config,
                id.0.clone(),
                std::future::pending(),
            ));
        }
    }

    /// A controller for the fixture's group, pinned at `pin` minions.
    pub async fn start(fx: Fixture, pin: u32, join_timeout: &str) -> Scenario {
        start_with(fx, pin, join_timeout, LostAnswers::default()).await
    }

    /// Like [`start`], with `faults` on the controller's AWS calls.
    pub async fn start_with(
        fx: Fixture,
        pin: u32,
        join_timeout: &str,
        faults: LostAnswers,
    ) -> Scenario {
        start_full(fx, Some(pin), join_timeout, faults, None).await
    }

    /// A controller for the fixture's group, not pinned, whose policy also
    /// sizes on the backlog of the SQS queue at `queue_url` (in the
    /// fixture's moto account), 10 messages per minion.
    pub async fn start_with_sqs(fx: Fixture, queue_url: &str) -> Scenario {
        start_full(fx, None, "60s", LostAnswers::default(), Some(queue_url)).await
    }

    async fn start_full(
        fx: Fixture,
        pin: Option<u32>,
        join_timeout: &str,
        faults: LostAnswers,
        sqs: Option<&str>,
    ) -> Scenario {
        gru_proto::install_crypto_provider();
        let dir = tempfile::tempdir().expect("tempdir");
        DevPki::in_dir(dir.path()).ensure().expect("dev pki");
        std::fs::write(dir.path().join("token"), TOKEN).expect("token");
        let c = fx.fleet.config().clone();
        let mut aws = format!(
            "group_name = {:?}\ntarget_group_arn = {:?}\nendpoint_url = {:?}\n\
             max_attempts = 1\nheartbeat_interval = \"500ms\"\n",
            c.group_name,
            c.target_group_arn,
            super::moto().url
        );
        for (key, hook) in [
            ("launching_hook", &c.launching_hook),
            ("terminating_hook", &c.terminating_hook),
        ] {
            if let Some(name) = hook {
                aws.push_str(&format!("{key} = {name:?}\n"));
            }
        }
        let sqs_table = match sqs {
            Some(url) => format!(
                "[fleet.sqs]\nqueue_url = {url:?}\nregion = {:?}\nendpoint_url = {:?}\ntarget_per_minion = 10\n",
                gru_aws::testing::REGION,
                super::moto().url
            ),
            None => String::new(),
        };
        let text = format!(
            r#"
            listen = "127.0.0.1:0"
            report_interval = "200ms"
            lost_timeout = "5s"
            eval_interval = "200ms"
            join_timeout = "{join_timeout}"
            join_token_file = "token"
            [tls]
            cert = "controller.pem"
            key = "controller.key"
            client_ca = "ca.pem"
            [[fleet]]
            name = "{FLEET}"
            provider = "aws"
            min = 0
            max = 5
            max_step_in = 5
            [fleet.aws]
            {aws}
            {sqs_table}
            "#
        );
        let config = ControllerConfig::parse(&dir.path().join("controller.toml"), &text)
            .expect("controller config");
        let parsed = config.fleets[0].provider.aws().expect("an aws fleet");
        assert_eq!(parsed.fleet.group_name, c.group_name);
        assert_eq!(parsed.fleet.terminating_hook, c.terminating_hook);
        let controller_clients = super::clients_in(&super::moto().url, &fx.account, faults);
        let fleet = AwsFleet::from_clients(c, controller_clients);
        let mut runtime = FleetRuntime::with_hooks(config.fleets[0].clone(), Arc::new(fleet));
        if let Some(url) = sqs {
            assert!(config.fleets[0].sqs.is_some(), "[fleet.sqs] parsed");
            let client = gru_aws::testing::sqs_client(&super::moto().url, &fx.account);
            runtime = runtime.with_signal(Arc::new(gru_aws::SqsSignal::from_client(client, url)));
        }
        let store =
            gru_controller::store::SqliteStore::open(&dir.path().join("state")).expect("store");
        let controller = Controller::new(config, vec![runtime], TOKEN.to_owned(), Arc::new(store))
            .expect("controller");
        if let Some(pin) = pin {
            pin_at(&controller, pin);
        }

        let sink_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let sink = sink_listener.local_addr().expect("addr");
        tokio::spawn(gru_engine::bench::run_sink(
            sink_listener,
            Default::default(),
            gru_engine::bench::SinkHandle::new(),
            std::future::pending(),
        ));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(gru_controller::run(controller.clone(), listener, async {
            let _ = stopped.await;
        }));
        Scenario {
            fx,
            controller,
            agents: Agents {
                controller: addr,
                sink,
                dir: dir.path().to_owned(),
                started: Arc::new(Mutex::new(HashSet::new())),
            },
            _stop: stop,
            _dir: dir,
        }
    }

    /// What an operator's `gru scale FLEET N` does.
    pub fn pin_at(controller: &Controller, n: u32) {
        controller
            .fleet(FLEET)
            .expect("fleet")
            .registry()
            .fleet_state_mut(FLEET)
            .expect("fleet")
            .pin = Some(gru_controller::registry::PinOverride {
            pin: Pin {
                desired: n,
                until: None,
            },
            origin: gru_controller::store::Origin {
                by: "test".to_owned(),
                at_ms: 0,
            },
        });
        controller.wake(FLEET);
    }

    /// Polls `f` until it returns a value; the scenario's time bound ends
    /// the wait if it never does.
    pub async fn until<T, F, Fut>(what: &str, mut f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let start = std::time::Instant::now();
        loop {
            if let Some(v) = f().await {
                return v;
            }
            assert!(
                start.elapsed() < SCENARIO_TIMEOUT,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    impl Scenario {
        /// Starts an agent for `id`, as the instance's cloud-init would.
        pub fn start_agent(&self, id: &InstanceId) {
            self.agents.start(id);
        }

        /// Starts an agent on every instance the group launches, now and
        /// later (a replacement boots its own).
        pub fn agents_on_every_instance(&self) {
            let agents = self.agents.clone();
            let fleet =
                AwsFleet::from_clients(self.fx.fleet.config().clone(), self.fx.clients.clone());
            tokio::spawn(async move {
                loop {
                    if let Ok(g) = fleet.describe_group().await {
                        for i in &g.instances {
                            if matches!(
                                i.lifecycle,
                                AwsLifecycle::Pending
                                    | AwsLifecycle::PendingWait
                                    | AwsLifecycle::InService
                            ) {
                                agents.start(&i.id);
                            }
                        }
                    }
                    tokio::time::sleep(POLL).await;
                }
            });
        }

        /// The minion of instance `id` and its state, if the controller
        /// knows it.
        pub fn minion(&self, id: &InstanceId) -> Option<(String, MinionState)> {
            self.controller
                .fleet(FLEET)
                .expect("fleet")
                .registry()
                .minion_by_instance(id)
                .map(|m| (m.id.clone(), m.state()))
        }

        /// Minions the controller has in `state`.
        pub fn in_state(&self, state: MinionState) -> Vec<(String, InstanceId)> {
            self.controller
                .fleet(FLEET)
                .expect("fleet")
                .registry()
                .minions()
                .filter(|m| m.state() == state)
                .map(|m| (m.id.clone(), m.instance.clone()))
                .collect()
        }

        /// The states a minion went through, in order.
        pub fn path(&self, minion: &str) -> Vec<MinionState> {
            self.controller
                .fleet(FLEET)
                .expect("fleet")
                .registry()
                .find(minion)
                .expect("minion")
                .history
                .iter()
                .map(|h| h.to)
                .collect()
        }

        /// The controller's events about one minion, oldest first.
        pub fn events(&self, minion: &str) -> Vec<Event> {
            self.controller
                .events_since(std::time::UNIX_EPOCH, "", usize::MAX)
                .expect("events")
                .into_iter()
                .filter(|e| e.minion.as_deref() == Some(minion))
                .collect()
        }

        /// Instance ids registered in the fleet's target group, per moto.
        pub async fn registered_targets(&self) -> Vec<(String, i32)> {
            gru_aws::testing::registered_targets(&self.fx.clients, &self.fx.target_group_arn).await
        }

        /// The engine port a minion joined with.
        pub fn engine_port(&self, minion: &str) -> Option<u16> {
            self.controller
                .fleet(FLEET)
                .expect("fleet")
                .registry()
                .find(minion)
                .expect("minion")
                .engine_address
                .map(|a| a.port())
        }
    }

    /// Index of the first event matching `f`, or a panic naming `what`.
    pub fn position(events: &[Event], what: &str, f: impl Fn(&Event) -> bool) -> usize {
        events
            .iter()
            .position(f)
            .unwrap_or_else(|| panic!("no event {what} in {:#?}", messages(events)))
    }

    pub fn messages(events: &[Event]) -> Vec<String> {
        events.iter().map(|e| e.message.clone()).collect()
    }

    /// A step of a minion's lifecycle: a step event, or a transition
    /// (drain phases are transitions) whose reason says `text`.
    pub fn is_step(e: &Event, text: &str) -> bool {
        matches!(e.kind, EventKind::Step | EventKind::Transition) && e.message.contains(text)
    }

    pub fn is_transition_to(e: &Event, to: MinionState) -> bool {
        e.transition.is_some_and(|(_, t)| t == to)
    }
}

async fn scenario_bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(SCENARIO_TIMEOUT + Duration::from_secs(10), f)
        .await
        .expect("scenario ran past its time bound")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_scales_out_from_zero_and_registers_minions_once_they_join() {
    scenario_bounded(async {
        let sc = scenario::start(fixture(0, 5, 0).await, 3, "60s").await;
        sc.agents_on_every_instance();
        let ids = until("three instances in the group", || async {
            let g = sc.fx.fleet.describe_group().await.ok()?;
            (g.instances.len() == 3).then(|| ids(g.instances.iter()))
        })
        .await;
        assert_eq!(sc.fx.desired().await, 3);
        let minions = until("three minions in service", || async {
            let m: Vec<_> = ids.iter().filter_map(|i| sc.minion(i)).collect();
            (m.len() == 3 && m.iter().all(|(_, s)| *s == MinionState::InService)).then_some(m)
        })
        .await;
        let mut want: Vec<(String, i32)> = ids
            .iter()
            .zip(&minions)
            .map(|(i, (m, _))| {
                let port = sc.engine_port(m).expect("joined with an engine address");
                (i.0.clone(), i32::from(port))
            })
            .collect();
        want.sort();
        assert_eq!(sc.registered_targets().await, want);
        for (m, _) in &minions {
            assert_eq!(
                sc.path(m),
                [
                    MinionState::Joining,
                    MinionState::Ready,
                    MinionState::InService
                ],
                "registered only once its engine was healthy"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_scales_in_by_deregistering_draining_then_terminating_once() {
    scenario_bounded(async {
        // With the terminating hook of the recommended set-up: the
        // controller's own terminate also waits in Terminating:Wait, and the
        // controller completes it.
        let fx = fixture_with(0, 5, 3, terminating_hook).await;
        fx.put_hooks().await;
        let sc = scenario::start(fx, 3, "60s").await;
        sc.agents_on_every_instance();
        until("three minions in service", || async {
            (sc.in_state(MinionState::InService).len() == 3
                && sc.registered_targets().await.len() == 3)
                .then_some(())
        })
        .await;

        pin_at(&sc.controller, 1);
        let lowest = std::sync::atomic::AtomicI32::new(i32::MAX);
        let gone = until("two minions gone and one instance left", || async {
            lowest.fetch_min(sc.fx.desired().await, std::sync::atomic::Ordering::SeqCst);
            let g = sc.fx.fleet.describe_group().await.ok()?;
            let gone = sc.in_state(MinionState::Gone);
            (gone.len() == 2 && g.instances.len() == 1).then_some(gone)
        })
        .await;
        let lowest = lowest.into_inner();
        assert_eq!(sc.fx.desired().await, 1);
        assert_eq!(lowest, 1, "desired never went below the pin");

        for (m, instance) in &gone {
            assert_eq!(
                sc.path(m),
                [
                    MinionState::Joining,
                    MinionState::Ready,
                    MinionState::InService,
                    MinionState::Draining(DrainPhase::Deregistering),
                    MinionState::Draining(DrainPhase::Flushing),
                    MinionState::Draining(DrainPhase::AwaitingUnused),
                    MinionState::Drained,
                    MinionState::Terminating,
                    MinionState::Gone,
                ]
            );
            let events = sc.events(m);
            let deregistered = position(&events, "deregistered", |e| {
                is_step(e, "deregistered from the load balancer")
            });
            let drain = position(&events, "drain command", |e| {
                is_step(e, "drain command sent")
            });
            let drained = position(&events, "→ Drained", |e| {
                is_transition_to(e, MinionState::Drained)
            });
            let terminating = position(&events, "→ Terminating", |e| {
                is_transition_to(e, MinionState::Terminating)
            });
            assert!(
                deregistered < drain && drain < drained && drained < terminating,
                "{:#?}",
                messages(&events)
            );
            let decrements = events
                .iter()
                .filter(|e| e.message.contains("desired capacity decremented"))
                .count();
            assert_eq!(decrements, 1, "{:#?}", messages(&events));
            assert!(
                events.iter().any(|e| is_step(
                    e,
                    &format!("terminating lifecycle action of {instance} completed: CONTINUE")
                )),
                "{:#?}",
                messages(&events)
            );
        }
        let survivor = sc.in_state(MinionState::InService);
        assert_eq!(survivor.len(), 1);
        let listed = sc.registered_targets().await;
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].0, survivor[0].1.0);

        // A few passes later nothing else moved: no replacement, no second
        // decrement.
        let settle = std::time::Instant::now();
        until("a second of passes", || async {
            (settle.elapsed() > Duration::from_secs(1)).then_some(())
        })
        .await;
        assert_eq!(sc.fx.desired().await, 1);
        assert_eq!(
            sc.fx.fleet.describe_group().await.unwrap().instances.len(),
            1
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_termination_the_group_started_is_drained_heartbeated_and_continued() {
    scenario_bounded(async {
        let fx = fixture_with(0, 3, 2, terminating_hook).await;
        fx.put_hooks().await;
        let sc = scenario::start(fx, 2, "60s").await;
        sc.agents_on_every_instance();
        let serving = until("two minions in service", || async {
            let s = sc.in_state(MinionState::InService);
            (s.len() == 2 && sc.registered_targets().await.len() == 2).then_some(s)
        })
        .await;
        let (victim, instance) = serving[0].clone();

        // The group terminates an instance by itself (a health replacement:
        // no decrement). The harness's layer holds it in Terminating:Wait.
        sc.fx
            .clients
            .autoscaling
            .terminate_instance_in_auto_scaling_group()
            .instance_id(&instance.0)
            .should_decrement_desired_capacity(false)
            .send()
            .await
            .expect("TerminateInstanceInAutoScalingGroup");

        until("the victim gone", || async {
            (sc.minion(&instance).map(|(_, s)| s) == Some(MinionState::Gone)).then_some(())
        })
        .await;
        assert_eq!(
            &sc.path(&victim)[2..],
            [
                MinionState::InService,
                MinionState::Draining(DrainPhase::Deregistering),
                MinionState::Draining(DrainPhase::Flushing),
                MinionState::Draining(DrainPhase::AwaitingUnused),
                MinionState::Drained,
                MinionState::Terminating,
                MinionState::Gone,
            ]
        );
        let events = sc.events(&victim);
        let draining = position(&events, "→ Draining", |e| {
            is_transition_to(e, MinionState::DRAINING)
        });
        assert!(
            events[draining]
                .message
                .contains("terminating lifecycle hook"),
            "{}",
            events[draining].message
        );
        let deregistered = position(&events, "deregistered", |e| {
            is_step(e, "deregistered from the load balancer")
        });
        let drain = position(&events, "drain command", |e| {
            is_step(e, "drain command sent")
        });
        let heartbeat = position(&events, "heartbeat", |e| {
            is_step(e, "lifecycle heartbeat recorded")
        });
        let drained = position(&events, "→ Drained", |e| {
            is_transition_to(e, MinionState::Drained)
        });
        let completed = position(&events, "CONTINUE", |e| {
            e.message.contains("terminating lifecycle action") && e.message.contains("CONTINUE")
        });
        assert!(
            deregistered < drain && drain < drained && heartbeat < completed && drained < completed,
            "{:#?}",
            messages(&events)
        );
        assert!(
            !events
                .iter()
                .any(|e| e.message.contains("desired capacity decremented")
                    || e.message.contains("to be replaced")),
            "never terminated by the controller: {:#?}",
            messages(&events)
        );
        assert!(
            !sc.registered_targets()
                .await
                .iter()
                .any(|(id, _)| *id == instance.0),
            "out of the target group"
        );
        // The group's replacement joins and serves; desired never moved.
        until("the replacement in service", || async {
            (sc.in_state(MinionState::InService).len() == 2).then_some(())
        })
        .await;
        assert_eq!(sc.fx.desired().await, 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launching_hook_is_completed_only_once_the_minion_has_joined() {
    scenario_bounded(async {
        let fx = fixture_with(0, 3, 0, launching_hook).await;
        fx.put_hooks().await;
        let sc = scenario::start(fx, 1, "60s").await;
        let held = until("an instance held in Pending:Wait and known", || async {
            let g = sc.fx.fleet.describe_group().await.ok()?;
            let held = ids(g.awaiting(LifecycleHook::Launching));
            (held.len() == 1 && sc.minion(&held[0]).is_some()).then(|| held[0].clone())
        })
        .await;
        // No agent yet: several passes go by and the action stays open.
        let since = std::time::Instant::now();
        until("a second of passes", || async {
            (since.elapsed() > Duration::from_secs(1)).then_some(())
        })
        .await;
        let g = sc.fx.fleet.describe_group().await.unwrap();
        assert_eq!(
            g.instance(&held).unwrap().lifecycle,
            AwsLifecycle::PendingWait
        );
        assert_eq!(sc.minion(&held).unwrap().1, MinionState::Pending);

        sc.start_agent(&held);
        until("the instance in service", || async {
            let g = sc.fx.fleet.describe_group().await.ok()?;
            (g.instance(&held)?.lifecycle == AwsLifecycle::InService).then_some(())
        })
        .await;
        let (minion, _) = sc.minion(&held).unwrap();
        let events = sc.events(&minion);
        let ready = position(&events, "→ Ready", |e| {
            is_transition_to(e, MinionState::Ready)
        });
        let completed = position(&events, "CONTINUE", |e| {
            is_step(e, "launching lifecycle action") && e.message.contains("CONTINUE")
        });
        assert!(ready < completed, "{:#?}", messages(&events));
        until("the minion in service", || async {
            (sc.minion(&held)?.1 == MinionState::InService).then_some(())
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_never_joins_is_marked_unhealthy_not_terminated() {
    scenario_bounded(async {
        let fx = fixture(0, 3, 1).await;
        let sc = scenario::start(fx, 1, "1s").await;
        let id = until("the instance known", || async {
            let g = sc.fx.fleet.describe_group().await.ok()?;
            let id = g.instances.first()?.id.clone();
            sc.minion(&id).map(|_| id)
        })
        .await;
        until("the instance marked unhealthy", || async {
            let g = sc.fx.fleet.describe_group().await.ok()?;
            (!g.instance(&id)?.healthy).then_some(())
        })
        .await;
        let (minion, state) = sc.minion(&id).unwrap();
        // moto does not replace an unhealthy instance (AWS would, and the
        // minion would be Gone once it leaves the group).
        assert_eq!(state, MinionState::Terminating);
        let events = sc.events(&minion);
        assert!(
            events.iter().any(|e| e.message.contains("never joined")),
            "{:#?}",
            messages(&events)
        );
        assert!(
            !events
                .iter()
                .any(|e| e.message.contains("desired capacity decremented")
                    || e.message.contains("to be replaced")),
            "{:#?}",
            messages(&events)
        );
        assert_eq!(sc.fx.desired().await, 1);
        assert_eq!(
            sc.fx.fleet.describe_group().await.unwrap().instances.len(),
            1
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attached_target_group_is_warned_about_once_and_left_to_the_group() {
    scenario_bounded(async {
        let fx = fixture(0, 3, 1).await;
        fx.clients
            .autoscaling
            .attach_load_balancer_target_groups()
            .auto_scaling_group_name(&fx.group)
            .target_group_arns(&fx.target_group_arn)
            .send()
            .await
            .expect("AttachLoadBalancerTargetGroups");
        let sc = scenario::start(fx, 1, "60s").await;
        sc.agents_on_every_instance();
        let (minion, instance) = until("the minion in service", || async {
            sc.in_state(MinionState::InService).pop()
        })
        .await;
        let events = sc.events(&minion);
        let registered = position(&events, "→ InService", |e| {
            is_transition_to(e, MinionState::InService)
        });
        assert!(
            events[registered]
                .message
                .contains("the group registers it"),
            "{}",
            events[registered].message
        );
        // moto's group registered the instance on the target group's own
        // port; the controller did not add its engine's.
        let port = sc.engine_port(&minion).expect("engine address");
        assert!(
            !sc.registered_targets()
                .await
                .contains(&(instance.0.clone(), i32::from(port)))
        );

        pin_at(&sc.controller, 0);
        until("the minion gone", || async {
            (sc.minion(&instance)?.1 == MinionState::Gone).then_some(())
        })
        .await;
        let events = sc.events(&minion);
        assert!(
            events.iter().any(|e| is_step(e, "drain command sent"))
                && !events
                    .iter()
                    .any(|e| is_step(e, "deregistered from the load balancer")),
            "{:#?}",
            messages(&events)
        );
        assert_eq!(sc.fx.desired().await, 0);
        let warnings = sc
            .controller
            .events_since(std::time::UNIX_EPOCH, "", usize::MAX)
            .expect("events")
            .into_iter()
            .filter(|e| e.minion.is_none() && e.message.contains("is attached to group"))
            .count();
        assert_eq!(warnings, 1, "warned once");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminate_whose_answer_is_lost_decrements_once_and_orphans_nothing() {
    scenario_bounded(async {
        let faults = LostAnswers::default();
        let sc = scenario::start_with(fixture(0, 5, 2).await, 2, "60s", faults.clone()).await;
        sc.agents_on_every_instance();
        until("two minions in service", || async {
            (sc.in_state(MinionState::InService).len() == 2).then_some(())
        })
        .await;

        faults.armed.store(1, Ordering::SeqCst);
        pin_at(&sc.controller, 1);
        let (victim, _) = until("one minion gone", || async {
            sc.in_state(MinionState::Gone).pop()
        })
        .await;
        assert_eq!(faults.armed.load(Ordering::SeqCst), 0, "the fault fired");
        let events = sc.events(&victim);
        let lost = position(&events, "the failed terminate", |e| {
            e.kind == gru_controller::registry::EventKind::Warning
                && e.message.contains("TerminateInstanceInAutoScalingGroup")
        });
        // Terminating was recorded before the call. moto applied it: the
        // instance left the group, and the controller, seeing it gone,
        // asked nothing more.
        let path = sc.path(&victim);
        assert_eq!(
            &path[path.len() - 3..],
            [
                MinionState::Drained,
                MinionState::Terminating,
                MinionState::Gone
            ],
            "{:#?}",
            messages(&events)
        );
        assert!(
            !events[lost..]
                .iter()
                .any(|e| e.message.starts_with("terminating i-")),
            "no second terminate: {:#?}",
            messages(&events)
        );
        // The decrement the lost answer would have confirmed is on record
        // once, from the group's view.
        let seen: Vec<_> = events[lost..]
            .iter()
            .filter(|e| e.message.contains("desired capacity decremented"))
            .collect();
        assert_eq!(seen.len(), 1, "{:#?}", messages(&events));
        assert!(
            seen[0].message.contains("took effect"),
            "{:#?}",
            messages(&events)
        );

        let settle = std::time::Instant::now();
        until("a second of passes", || async {
            (settle.elapsed() > Duration::from_secs(1)).then_some(())
        })
        .await;
        assert_eq!(sc.fx.desired().await, 1, "decremented exactly once");
        let g = sc.fx.fleet.describe_group().await.unwrap();
        assert_eq!(g.instances.len(), 1);
        assert_eq!(sc.in_state(MinionState::InService).len(), 1);
        assert_eq!(sc.registered_targets().await.len(), 1, "no orphaned target");
    })
    .await;
}

// ---- SQS ----

/// A fresh queue in `account`; its URL.
async fn queue(sqs: &aws_sdk_sqs::Client, name: &str) -> String {
    sqs.create_queue()
        .queue_name(name)
        .send()
        .await
        .expect("CreateQueue")
        .queue_url()
        .expect("a queue URL")
        .to_owned()
}

async fn send(sqs: &aws_sdk_sqs::Client, url: &str, n: usize) {
    for i in 0..n {
        sqs.send_message()
            .queue_url(url)
            .message_body(format!("MSH|^~\\&|LAB|{i}"))
            .send()
            .await
            .expect("SendMessage");
    }
}

/// Receives up to `n` messages and keeps them in flight (not deleted) for
/// five minutes.
async fn take(sqs: &aws_sdk_sqs::Client, url: &str, n: i32) -> usize {
    sqs.receive_message()
        .queue_url(url)
        .max_number_of_messages(n)
        .visibility_timeout(300)
        .send()
        .await
        .expect("ReceiveMessage")
        .messages()
        .len()
}

#[tokio::test]
async fn an_sqs_signal_counts_visible_and_in_flight_messages() {
    bounded(async {
        let account = gru_aws::testing::random_account();
        let sqs = gru_aws::testing::sqs_client(&moto().url, &account);
        let url = queue(&sqs, "hl7-inbound").await;
        let signal = gru_aws::SqsSignal::from_client(sqs.clone(), url.clone());
        assert_eq!(signal.name(), "sqs");
        assert_eq!(signal.read().await.expect("read"), 0, "an empty queue");
        send(&sqs, &url, 7).await;
        assert_eq!(signal.read().await.expect("read"), 7);
        // Messages being worked on still count: a consumer holding them
        // must not see its fleet scale in under it.
        let taken = take(&sqs, &url, 5).await;
        assert!(taken > 0, "received some");
        assert_eq!(signal.read().await.expect("read"), 7, "{taken} in flight");

        let missing = gru_aws::SqsSignal::from_client(sqs, format!("{url}-gone"));
        let e = missing.read().await.expect_err("no such queue");
        let text = gru_core::error_chain(&e);
        assert!(
            text.contains("GetQueueAttributes") && text.contains("NonExistentQueue"),
            "{text}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sqs_backlog_wakes_a_fleet_from_zero_and_in_flight_messages_keep_it() {
    scenario_bounded(async {
        let fx = fixture(0, 5, 0).await;
        let sqs = gru_aws::testing::sqs_client(&moto().url, &fx.account);
        let url = queue(&sqs, "hl7-batch").await;
        let sc = scenario::start_with_sqs(fx, &url).await;
        let decision = || {
            sc.controller
                .fleet(scenario::FLEET)
                .expect("fleet")
                .registry()
                .fleet_state(scenario::FLEET)
                .and_then(|f| f.last_decision.clone())
        };
        // An empty queue: the fleet stays at zero, pass after pass.
        let first = until("a first decision", || async { decision() }).await;
        until("three more passes", || async {
            decision().filter(|d| {
                d.explanation.at > first.explanation.at + jiff::SignedDuration::from_millis(600)
            })
        })
        .await;
        let d = decision().expect("decision");
        assert_eq!(d.desired, 0, "{:?}", d.explanation);
        assert_eq!(sc.fx.desired().await, 0);
        assert!(
            d.explanation
                .recommendations
                .iter()
                .any(|r| r.detail == "sqs 0 / 10 per minion"),
            "{:?}",
            d.explanation.recommendations
        );

        // Messages arrive: the next pass wakes the fleet (25 / 10 = 3).
        send(&sqs, &url, 25).await;
        until("the group woken to 3", || async {
            (sc.fx.desired().await == 3).then_some(())
        })
        .await;
        // Taken by consumers but not deleted: still 25 to be done.
        take(&sqs, &url, 10).await;
        let taken_at = jiff::Timestamp::now();
        let d = until("a decision after the receive", || async {
            decision().filter(|d| d.explanation.at > taken_at)
        })
        .await;
        assert_eq!(d.desired, 3, "{:?}", d.explanation);
        assert!(
            d.explanation
                .recommendations
                .iter()
                .any(|r| r.detail == "sqs 25 / 10 per minion"),
            "{:?}",
            d.explanation.recommendations
        );
        // What the controller read is on its metrics, with no read failed.
        let metrics = sc.controller.metrics_site().encode(false).body;
        assert!(
            metrics.contains(&format!(
                "gru_signal_value{{fleet=\"{}\",signal=\"sqs\"}} 25",
                scenario::FLEET
            )),
            "{metrics}"
        );
        assert!(
            !metrics.contains("gru_signal_read_errors_total{"),
            "{metrics}"
        );
    })
    .await;
}
