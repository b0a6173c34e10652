//! Restart scenarios: a scale-in driven pass by pass, with the controller
//! dropped and built again on the same store between any two passes. The
//! group is [`StaticGroup`], the load balancer a real [`LocalLoadBalancer`]
//! behind a recorder, and the agents are scripted: they join, hold a
//! Session, obey Drain and report, straight against the registry, as the
//! real agent does over gRPC (the gRPC edge is tested in the parent module).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use gru_cloud::local::LocalLoadBalancer;
use gru_cloud::{CloudError, InstanceId, Target, TargetGroup, TargetState};
use gru_controller::registry::{Command, PinOverride, Report};
use gru_controller::store::{Origin, SqliteStore};
use gru_controller::{Controller, FleetRuntime};
use gru_core::MinionState;
use gru_core::policy::Pin;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::{StaticGroup, config};

const FLEET: &str = "local";
/// Passes a scale-in may take before the scenario gives up.
const MAX_PASSES: usize = 60;

/// Every call that changes the cloud, in order, shared by the recorder and
/// the group so the test reads one history.
type Log = Arc<Mutex<Vec<String>>>;

/// The real local load balancer, with every register and deregister call
/// written to the log.
struct Recorder {
    inner: Arc<LocalLoadBalancer>,
    log: Log,
}

#[async_trait]
impl TargetGroup for Recorder {
    async fn register(&self, target: &Target) -> Result<(), CloudError> {
        push(&self.log, format!("register {}", target.instance));
        self.inner.register(target).await
    }
    async fn deregister(&self, target: &Target) -> Result<(), CloudError> {
        push(&self.log, format!("deregister {}", target.instance));
        self.inner.deregister(target).await
    }
    async fn target_state(&self, target: &Target) -> Result<TargetState, CloudError> {
        self.inner.target_state(target).await
    }
}

fn push(log: &Log, line: String) {
    log.lock().expect("log").push(line);
}

/// One scripted agent and its engine.
pub(crate) struct Agent {
    fleet: &'static str,
    instance: InstanceId,
    port: u16,
    minion: String,
    generation: u64,
    commands: Option<mpsc::Receiver<Result<Command, tonic::Status>>>,
    seq: u64,
    /// The engine was told to drain (it remembers across controller
    /// restarts, as a real engine does).
    draining: bool,
    /// Reports a draining engine still makes with work in hand before it
    /// is drained.
    pub(crate) flush_reports: u32,
}

impl Agent {
    pub(crate) fn new(fleet: &'static str, instance: &str, port: u16) -> Self {
        Agent {
            fleet,
            instance: InstanceId::from(instance),
            port,
            minion: String::new(),
            generation: 0,
            commands: None,
            seq: 0,
            draining: false,
            flush_reports: 0,
        }
    }

    /// Join and open a Session, as the agent does whenever its Session
    /// breaks (here: the controller went away). A minion on its way to
    /// termination is refused, as over gRPC; the agent then has no Session.
    pub(crate) fn connect(&mut self, c: &Controller) {
        let now = gru_controller::now();
        self.commands = None;
        let joined = c.fleet(self.fleet).expect("fleet").registry().join(
            self.fleet,
            &self.instance,
            ([127, 0, 0, 1], self.port).into(),
            now,
        );
        let Ok((id, token)) = joined else {
            return;
        };
        let (tx, rx) = mpsc::channel(16);
        let Ok((generation, resend)) = c
            .fleet(self.fleet)
            .expect("fleet")
            .registry()
            .attach_session(&id, &token, tx, Duration::from_secs(60), now)
        else {
            return;
        };
        self.minion = id;
        self.generation = generation;
        self.commands = Some(rx);
        self.seq = 0;
        if resend.is_some() {
            self.draining = true;
        }
    }

    /// The minion's id and its Session's generation.
    pub(crate) fn session(&self) -> (&str, u64) {
        (&self.minion, self.generation)
    }

    /// Takes the commands sent so far and reports once. A draining engine
    /// with nothing queued is drained at once.
    pub(crate) fn tick(&mut self, c: &Controller) {
        if let Some(rx) = self.commands.as_mut() {
            while let Ok(cmd) = rx.try_recv() {
                match cmd {
                    Ok(Command::Drain { .. }) => self.draining = true,
                    Ok(Command::Resume) => self.draining = false,
                    // It reports no connections and asks for no renewal:
                    // never sent.
                    Ok(Command::Shed { .. } | Command::Certificate(_)) | Err(_) => {}
                }
            }
        }
        self.seq += 1;
        let flushing = self.draining && self.flush_reports > 0;
        if flushing {
            self.flush_reports -= 1;
        }
        let report = Report {
            seq: self.seq,
            queue_depth: u64::from(flushing),
            healthy: true,
            draining: self.draining,
            drained: self.draining && !flushing,
            ..Default::default()
        };
        let changed = c.fleet(self.fleet).expect("fleet").registry().report(
            &self.minion,
            self.generation,
            report,
            gru_controller::now(),
        );
        if changed {
            c.wake(self.fleet);
        }
    }
}

struct World {
    dir: tempfile::TempDir,
    group: Arc<StaticGroup>,
    targets: Arc<Recorder>,
    log: Log,
    agents: Vec<Agent>,
}

impl World {
    async fn new(instances: &[&str]) -> World {
        let dir = tempfile::tempdir().expect("tempdir");
        let log: Log = Arc::default();
        let lb = LocalLoadBalancer::start(
            TcpListener::bind("127.0.0.1:0").await.expect("bind"),
            Duration::from_secs(300),
        );
        World {
            group: StaticGroup::new(instances),
            targets: Arc::new(Recorder {
                inner: lb,
                log: log.clone(),
            }),
            log,
            agents: instances
                .iter()
                .zip(20_000..)
                .map(|(i, port)| Agent::new(FLEET, i, port))
                .collect(),
            dir,
        }
    }

    /// A controller on the world's store, group and load balancer: the
    /// first one, or the one that replaces a controller that died.
    fn controller(&self) -> Arc<Controller> {
        let config = config(self.dir.path());
        let fleet = FleetRuntime::new(
            config.fleets[0].clone(),
            self.group.clone(),
            self.targets.clone(),
        );
        let store = SqliteStore::open(&config.state_dir).expect("store");
        Controller::new(config, vec![fleet], "token".to_owned(), Arc::new(store))
            .expect("controller")
    }

    /// One reconcile pass, then every agent takes its commands and reports.
    async fn pass(&mut self, c: &Controller) {
        c.reconcile(FLEET).await.expect("pass");
        for a in &mut self.agents {
            if a.commands.is_some() {
                a.tick(c);
            }
        }
    }

    fn state(&self, c: &Controller, instance: &str) -> MinionState {
        c.fleet(FLEET)
            .expect("fleet")
            .registry()
            .minion_by_instance(&InstanceId::from(instance))
            .map(|m| m.state())
            .expect("known minion")
    }

    fn lines(&self) -> Vec<String> {
        self.log.lock().expect("log").clone()
    }
}

fn pin(c: &Controller, desired: u32) {
    let mut reg = c.fleet(FLEET).expect("fleet").registry();
    reg.fleet_state_mut(FLEET).expect("fleet").pin = Some(PinOverride {
        pin: Pin {
            desired,
            until: None,
        },
        origin: Origin {
            by: "test".to_owned(),
            at_ms: 0,
        },
    });
    reg.persist_fleet(FLEET);
}

/// Two minions in service, then a pin at 1: the scale-in runs pass by pass
/// and the controller is replaced after pass `restart_after` (never, with
/// `None`). Returns the world, the victim's instance and the passes taken.
async fn scale_in(restart_after: Option<usize>) -> (World, String, usize) {
    let mut w = World::new(&["i-1", "i-2"]).await;
    let mut c = w.controller();
    for a in &mut w.agents {
        a.connect(&c);
    }
    for _ in 0..MAX_PASSES {
        w.pass(&c).await;
        if ["i-1", "i-2"]
            .iter()
            .all(|i| w.state(&c, i) == MinionState::InService)
        {
            break;
        }
    }
    assert_eq!(w.state(&c, "i-1"), MinionState::InService);
    pin(&c, 1);
    let mut victim = None;
    for pass in 0..MAX_PASSES {
        if restart_after == Some(pass) {
            // The controller dies here: its registry, sessions and memory
            // go; the store, the group and the load balancer stay.
            drop(c);
            c = w.controller();
            for a in &mut w.agents {
                a.connect(&c);
            }
        }
        w.pass(&c).await;
        if victim.is_none() {
            victim = ["i-1", "i-2"]
                .into_iter()
                .find(|i| w.state(&c, i).is_leaving());
            if let Some(v) = victim {
                push(&w.log, format!("chosen {v}"));
            }
        }
        if let Some(v) = victim
            && w.state(&c, v) == MinionState::Gone
        {
            return (w, v.to_owned(), pass + 1);
        }
    }
    panic!(
        "the scale-in did not finish in {MAX_PASSES} passes: {:#?}",
        w.lines()
    );
}

/// What must hold however the scale-in was interrupted.
fn assert_clean(w: &World, victim: &str) {
    let lines = w.lines();
    let chosen = lines
        .iter()
        .position(|l| *l == format!("chosen {victim}"))
        .expect("victim chosen");
    assert!(
        !lines[chosen..].contains(&format!("register {victim}")),
        "the victim was registered again after its drain began: {lines:#?}"
    );
    assert_eq!(
        *w.group.terminated.lock().expect("lock"),
        vec![(InstanceId::from(victim), true)],
        "terminated once, decremented once"
    );
    assert_eq!(w.group.state.lock().expect("lock").desired, 1);
    let survivor = if victim == "i-1" { "i-2" } else { "i-1" };
    assert!(
        w.targets
            .inner
            .targets()
            .iter()
            .all(|t| t.target.instance.0 == survivor),
        "only the survivor is in the load balancer"
    );
}

#[tokio::test]
async fn a_scale_in_without_restart_is_clean() {
    let (w, victim, passes) = scale_in(None).await;
    assert_clean(&w, &victim);
    assert!(passes >= 3, "deregister, flush, await unused, terminate");
}

/// A controller replaced between any two passes of a scale-in finishes it:
/// never registers the victim again, decrements exactly once.
#[tokio::test]
async fn a_restart_between_any_two_passes_of_a_scale_in_is_clean() {
    let (_, _, passes) = scale_in(None).await;
    for k in 0..=passes {
        let (w, victim, _) = scale_in(Some(k)).await;
        assert_clean(&w, &victim);
    }
}

/// Ids, history and the pin are the same after a restart; the survivor is
/// registered again (the load balancer may have lost it) without a new
/// transition.
#[tokio::test]
async fn ids_history_and_pins_survive_a_restart() {
    let (w, victim, _) = scale_in(None).await;
    let before = w.controller();
    let ids: Vec<(String, String)> = before
        .fleet(FLEET)
        .expect("fleet")
        .registry()
        .minions()
        .map(|m| (m.id.clone(), m.instance.0.clone()))
        .collect();
    let history = before
        .fleet(FLEET)
        .expect("fleet")
        .registry()
        .minion_by_instance(&InstanceId::from(victim.as_str()))
        .map(|m| m.history.iter().map(|h| h.to).collect::<Vec<_>>())
        .expect("victim");
    drop(before);
    let after = w.controller();
    let reg = after.fleet(FLEET).expect("fleet").registry();
    let again: Vec<(String, String)> = reg
        .minions()
        .map(|m| (m.id.clone(), m.instance.0.clone()))
        .collect();
    assert_eq!(ids, again);
    let victim_after = reg
        .minion_by_instance(&InstanceId::from(victim.as_str()))
        .expect("victim");
    assert_eq!(victim_after.state(), MinionState::Gone);
    assert_eq!(
        victim_after
            .history
            .iter()
            .map(|h| h.to)
            .collect::<Vec<_>>(),
        history
    );
    assert_eq!(
        reg.fleet_state(FLEET)
            .expect("fleet")
            .pin
            .as_ref()
            .map(|p| p.pin.desired),
        Some(1)
    );
}
