//! The minion agent with several controllers: it goes where a standby says
//! the leader is, past a controller that is down, and keeps its identity
//! (certificate and minion id) when the leader moves.

use std::sync::Arc;

use gru_minion::Agent;
use gru_minion::engine::FixedEngine;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::{Leader, Logs, QUEUE, Site, Standby, dead_address, wait_until};

/// The real agent for `instance`, running until dropped.
struct Minion {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Minion {
    fn start(config: gru_minion::MinionConfig, instance: &str) -> Minion {
        let agent = Agent::new(
            config,
            instance.to_owned(),
            Arc::new(FixedEngine::new(QUEUE)),
        )
        .expect("agent");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            agent
                .run(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Minion {
            stop: Some(stop),
            task,
        }
    }
}

impl Drop for Minion {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

#[tokio::test]
async fn a_minion_told_of_a_standby_first_follows_it_to_the_leader() {
    let (logs, _guard) = Logs::capture();
    let site = Site::make();
    let leader = Leader::start(site.config.clone(), &["i-ha-1"]);
    let standby = Standby::start(&site.config, &leader.address).await;

    let _minion = Minion::start(
        site.minion_config(&[&standby.address, &leader.address]),
        "i-ha-1",
    );
    wait_until("the minion to report to the leader", || {
        leader.reporting("i-ha-1")
    })
    .await;
    let text = logs.text();
    assert!(
        text.contains(&format!(
            "controller {} is a standby; following the leader at {}",
            standby.address, leader.address
        )),
        "{text}"
    );
}

#[tokio::test]
async fn a_minion_passes_over_a_controller_that_is_down() {
    let (logs, _guard) = Logs::capture();
    let site = Site::make();
    let leader = Leader::start(site.config.clone(), &["i-ha-1"]);
    let dead = dead_address();

    let _minion = Minion::start(site.minion_config(&[&dead, &leader.address]), "i-ha-1");
    wait_until("the minion to report to the leader", || {
        leader.reporting("i-ha-1")
    })
    .await;
    let text = logs.text();
    assert!(
        text.contains(&format!("controller {dead} did not take the Session"))
            && text.contains(&format!("trying {}", leader.address)),
        "{text}"
    );
}

/// The leader moves: the controller the minion reported to stops, and
/// another takes over the same store (and minion CA) at another address,
/// with a join token the minion does not have. The minion reaches it and
/// joins with the certificate the first one issued, as the same minion.
#[tokio::test]
async fn a_minion_keeps_its_identity_when_the_leader_moves() {
    let (logs, _guard) = Logs::capture();
    let site = Site::make();
    let first = Leader::start(site.config.clone(), &["i-ha-1"]);
    let next_address = dead_address();
    let standby = Standby::start(&site.config, &first.address).await;

    let _minion = Minion::start(
        site.minion_config(&[&standby.address, &first.address, &next_address]),
        "i-ha-1",
    );
    let id = wait_until("the minion to report to the first leader", || {
        first.reporting("i-ha-1")
    })
    .await;

    first.stop();
    standby.lease.names(&next_address);
    let listener = std::net::TcpListener::bind(next_address.trim_start_matches("https://"))
        .expect("the next leader's port");
    let next = Leader::start_on(
        site.config_with_token("a token the minion does not have"),
        listener,
        &["i-ha-1"],
    );
    let again = wait_until("the minion to report to the next leader", || {
        next.reporting("i-ha-1")
    })
    .await;
    assert_eq!(again, id, "the same minion");
    let text = logs.text();
    assert!(
        !text.contains("join token rejected"),
        "the minion joined with its certificate, not the token: {text}"
    );
}
