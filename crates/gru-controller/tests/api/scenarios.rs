//! Reconcile scenarios on a group with lifecycle hooks, against the scripted
//! fake of gru-cloud's provider traits (`gru_cloud::testing`), with tokio's
//! time paused: every age the controller measures moves only when the test
//! advances the clock. One scenario per test, each bounded.

use std::sync::Arc;
use std::time::Duration;

use gru_cloud::testing::ScriptedGroup;
use gru_controller::registry::Report;
use gru_controller::store::SqliteStore;
use gru_controller::{Controller, ControllerConfig, FleetRuntime};
use gru_core::MinionState;

use super::restart::Agent;

const FLEET: &str = "prod";
const SCENARIO_BOUND: Duration = Duration::from_secs(600);

fn config(dir: &std::path::Path) -> ControllerConfig {
    let text = r#"
        listen = "127.0.0.1:0"
        lost_timeout = "10s"
        join_token_file = "token"
        state_dir = "state"
        [tls]
        cert = "controller.pem"
        key = "controller.key"
        client_ca = "ca.pem"
        [[fleet]]
        name = "prod"
        provider = "aws"
        min = 0
        max = 3
        [fleet.aws]
        group_name = "g"
        target_group_arn = "arn:aws:elasticloadbalancing:eu-west-1:123456789012:targetgroup/t/0123456789abcdef"
        terminating_hook = "gru-terminating"
        heartbeat_interval = "30s"
    "#;
    ControllerConfig::parse(&dir.join("controller.toml"), text).expect("config")
}

struct Scenario {
    _dir: tempfile::TempDir,
    group: Arc<ScriptedGroup>,
    controller: Arc<Controller>,
    agents: Vec<Agent>,
}

impl Scenario {
    /// Two minions in service on the scripted group.
    async fn start() -> Scenario {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config(dir.path());
        let group = ScriptedGroup::new(&["i-1", "i-2"]);
        let fleet = FleetRuntime::with_hooks(config.fleets[0].clone(), group.clone());
        let store = SqliteStore::open(&config.state_dir).expect("store");
        let controller = Controller::new(config, vec![fleet], "token".to_owned(), Arc::new(store))
            .expect("controller");
        let mut agents = vec![
            Agent::new(FLEET, "i-1", 30_001),
            Agent::new(FLEET, "i-2", 30_002),
        ];
        for a in &mut agents {
            a.connect(&controller);
        }
        let mut s = Scenario {
            _dir: dir,
            group,
            controller,
            agents,
        };
        for _ in 0..10 {
            s.pass().await;
        }
        assert_eq!(s.state("i-1"), MinionState::InService);
        assert_eq!(s.state("i-2"), MinionState::InService);
        s
    }

    /// One pass, then every agent still connected reports.
    async fn pass(&mut self) {
        self.controller.reconcile(FLEET).await.expect("pass");
        for a in &mut self.agents {
            a.tick(&self.controller);
        }
    }

    fn state(&self, instance: &str) -> MinionState {
        self.controller
            .fleet(FLEET)
            .expect("fleet")
            .registry()
            .find(instance)
            .map(|m| m.state())
            .expect("known")
    }

    fn count(&self, call: &str) -> usize {
        self.group.calls().iter().filter(|c| *c == call).count()
    }
}

/// The group terminates i-1 itself (its terminating hook holds it): the
/// controller drains it, heartbeats the hook every 30 s while it holds the
/// instance, completes the action with CONTINUE, and never terminates or
/// decrements.
#[tokio::test(start_paused = true)]
async fn a_termination_held_by_the_hook_is_drained_heartbeated_and_continued() {
    tokio::time::timeout(SCENARIO_BOUND, async {
        let mut s = Scenario::start().await;
        s.agents[0].flush_reports = 5;
        s.group.hold_for_termination("i-1");
        for _ in 0..30 {
            s.pass().await;
            if s.state("i-1") == MinionState::Gone {
                break;
            }
            tokio::time::advance(Duration::from_secs(10)).await;
        }
        assert_eq!(s.state("i-1"), MinionState::Gone, "{:#?}", s.group.calls());
        let calls = s.group.calls();
        // Passes every 10 s: Drain at 0 s, the engine flushes for five
        // reports (drained at 50 s), the target is unused at 60 s and the
        // action completed at 70 s. Heartbeats at 0, 30 and 60 s: three, not
        // one per pass.
        assert_eq!(s.count("heartbeat Terminating i-1"), 3, "{calls:#?}");
        assert_eq!(
            s.count("complete Terminating i-1 CONTINUE"),
            1,
            "{calls:#?}"
        );
        assert!(
            !calls.iter().any(|c| c.starts_with("terminate")),
            "the group terminates it, not the controller: {calls:#?}"
        );
        assert_eq!(s.group.desired(), 2, "nothing decremented");
        assert_eq!(s.state("i-2"), MinionState::InService);
    })
    .await
    .expect("scenario within its bound");
}

/// A report read while the registry is held (by a long pass, an admin
/// call) does not wait for the lock: it is queued, and applied as the holder
/// lets the registry go.
#[tokio::test(start_paused = true)]
async fn a_report_read_while_the_registry_is_held_waits_in_the_inbox_not_on_the_lock() {
    let s = Scenario::start().await;
    let fleet = s.controller.fleet(FLEET).expect("fleet").clone();
    let (minion, generation) = s.agents[0].session();
    let minion: Arc<str> = minion.into();
    let now = gru_controller::now();
    let held = fleet.registry();
    let (returned, returned_rx) = std::sync::mpsc::channel();
    let reporter = {
        let fleet = fleet.clone();
        std::thread::spawn(move || {
            let report = Report {
                seq: 1_000,
                queue_depth: 7,
                healthy: true,
                ..Default::default()
            };
            fleet.report(&minion, generation, report, now, 0);
            let _ = returned.send(());
        })
    };
    returned_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the Session's report returns while another holds the registry");
    let queued =
        |reg: &gru_controller::registry::Registry| reg.find("i-1").expect("i-1").load().queue_depth;
    assert_eq!(queued(&held), 0, "not applied under another's lock");
    drop(held);
    reporter.join().expect("reporter");
    assert_eq!(
        queued(&fleet.registry()),
        7,
        "applied as the lock was let go"
    );
}

/// A minion that stops reporting is Lost once the lost timeout has passed,
/// not before, and is reported unhealthy for the group to replace (no
/// decrement).
#[tokio::test(start_paused = true)]
async fn a_silent_minion_is_lost_after_the_timeout_and_reported_unhealthy() {
    tokio::time::timeout(SCENARIO_BOUND, async {
        let mut s = Scenario::start().await;
        // i-1's agent goes silent; i-2's keeps reporting.
        s.agents.remove(0);
        tokio::time::advance(Duration::from_secs(9)).await;
        s.pass().await;
        assert_eq!(s.state("i-1"), MinionState::InService, "not yet");
        tokio::time::advance(Duration::from_secs(2)).await;
        s.pass().await;
        assert_eq!(s.state("i-1"), MinionState::Terminating);
        let calls = s.group.calls();
        assert_eq!(s.count("deregister i-1"), 1, "{calls:#?}");
        assert_eq!(s.count("unhealthy i-1"), 1, "{calls:#?}");
        assert!(
            !calls.iter().any(|c| c.starts_with("terminate")),
            "{calls:#?}"
        );
        assert_eq!(s.state("i-2"), MinionState::InService);
    })
    .await
    .expect("scenario within its bound");
}

/// On AWS a deregistered target stays `draining` for the whole
/// deregistration delay (300 s here). Once the drained engine has no
/// connection left, the controller waits `unused_grace` (10 s by default)
/// for it, not the delay, then terminates with the decrement.
#[tokio::test(start_paused = true)]
async fn a_drained_minion_waits_the_unused_grace_not_the_deregistration_delay() {
    tokio::time::timeout(SCENARIO_BOUND, async {
        let mut s = Scenario::start().await;
        s.group.keep_targets_draining();
        let id = s
            .controller
            .fleet(FLEET)
            .expect("fleet")
            .registry()
            .find("i-1")
            .map(|m| m.id.clone())
            .expect("minion");
        s.controller
            .fleet(FLEET)
            .expect("fleet")
            .registry()
            .choose_for_drain(&id, true, "scale-in", gru_controller::now())
            .expect("drain");
        // Deregistered, Drain sent, the engine reports drained.
        for _ in 0..3 {
            s.pass().await;
        }
        assert_eq!(
            s.state("i-1"),
            MinionState::Draining(gru_core::DrainPhase::AwaitingUnused)
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        s.pass().await;
        assert_eq!(
            s.state("i-1"),
            MinionState::Draining(gru_core::DrainPhase::AwaitingUnused),
            "within the grace, the target is still waited for"
        );
        tokio::time::advance(Duration::from_secs(6)).await;
        s.pass().await;
        s.pass().await;
        assert_eq!(s.state("i-1"), MinionState::Terminating);
        assert_eq!(
            s.count("terminate i-1 decrement"),
            1,
            "{:#?}",
            s.group.calls()
        );
    })
    .await
    .expect("scenario within its bound");
}
