//! What the controller's bookkeeping costs at fleet scale, in one process:
//! the registry with N minions in service (default 1,000) over a real
//! SQLite store in a temporary directory.
//!
//! `cargo bench -p gru-controller --bench registry [-- MINIONS]` prints:
//! - µs per report: one Session report taken into the registry (the hot
//!   path: every minion, every report interval);
//! - µs per pass: one reconcile pass's bookkeeping for the fleet (sync with
//!   the group's view, plan the actions, run the policy and decide), without
//!   the cloud calls;
//! - ms to resume: opening a registry on a store that holds the N minions
//!   (what a restarted controller does before its first pass), and that
//!   first pass.
//!
//! Each figure is the median of several rounds on one thread; the machine
//! is noisy, so compare figures from one run, not across runs.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use gru_cloud::{GroupState, Instance, InstanceId, InstanceLifecycle};
use gru_controller::ControllerConfig;
use gru_controller::registry::{Registry, Report};
use gru_controller::store::{Loaded, SqliteStore, Store};
use gru_core::plan::Limits;
use tokio::sync::{broadcast, mpsc};

const ROUNDS: usize = 7;

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1000);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path());
    let group = group(n);
    let now = Instant::now();
    let store = Arc::new(SqliteStore::open(&config.state_dir).expect("store"));
    let mut reg = Registry::open(
        &config.fleets,
        broadcast::channel(16).0,
        store,
        Loaded::default(),
        now,
    )
    .expect("registry");

    // N minions in service, each with a Session.
    let fill = Instant::now();
    reg.sync("f", group.clone(), now);
    let mut sessions = Vec::with_capacity(n);
    let mut receivers = Vec::with_capacity(n);
    for (k, i) in group.instances.iter().enumerate() {
        let addr = ([127, 0, 0, 1], 10_000 + (k % 50_000) as u16).into();
        let (id, token) = reg.join("f", &i.id, addr, now).expect("join");
        let (tx, rx) = mpsc::channel(4);
        receivers.push(rx);
        let (generation, _) = reg
            .attach_session(&id, &token, tx, Duration::from_secs(60), now)
            .expect("session");
        reg.report(&id, generation, report(1, true), now);
        sessions.push((id, generation));
    }
    // Registered (what the register calls would record).
    for (id, _) in &sessions {
        reg.transition(
            id,
            gru_core::LifecycleEvent::Registered,
            "bench",
            Instant::now(),
        )
        .expect("registered");
    }
    let filled = fill.elapsed();

    // Reports: every minion once per round.
    let mut seq = 1;
    let per_report = median((0..ROUNDS).map(|_| {
        seq += 1;
        let t = Instant::now();
        for (id, generation) in &sessions {
            reg.report(id, *generation, report(seq, true), Instant::now());
        }
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    }));

    // Passes: the bookkeeping of one reconcile pass.
    let wall = jiff::Timestamp::now();
    let per_pass = median((0..ROUNDS).map(|_| {
        let t = Instant::now();
        let now = Instant::now();
        reg.sync("f", group.clone(), now);
        let actions = reg.plan("f", &LIMITS, now);
        std::hint::black_box(actions);
        std::hint::black_box(reg.decide("f", now, wall, Vec::new()));
        t.elapsed().as_secs_f64() * 1e6
    }));
    drop(reg);

    // A restart: open on the store holding the N minions, then one pass.
    let (resume, first_pass) = {
        let rounds: Vec<(f64, f64)> = (0..ROUNDS)
            .map(|_| {
                let t = Instant::now();
                let store = Arc::new(SqliteStore::open(&config.state_dir).expect("store"));
                let loaded = store.load().expect("load");
                let mut reg = Registry::open(
                    &config.fleets,
                    broadcast::channel(16).0,
                    store,
                    loaded,
                    Instant::now(),
                )
                .expect("registry");
                let opened = t.elapsed();
                let now = Instant::now();
                reg.sync("f", group.clone(), now);
                std::hint::black_box(reg.plan("f", &LIMITS, now));
                std::hint::black_box(reg.decide("f", now, wall, Vec::new()));
                (
                    opened.as_secs_f64() * 1e3,
                    (t.elapsed() - opened).as_secs_f64() * 1e3,
                )
            })
            .collect();
        (
            median(rounds.iter().map(|r| r.0)),
            median(rounds.iter().map(|r| r.1)),
        )
    };
    println!("minions in service        {n}");
    println!(
        "filling the store         {:.0} ms",
        filled.as_secs_f64() * 1e3
    );
    println!("per report                {per_report:.2} µs");
    println!("per pass (bookkeeping)    {per_pass:.0} µs");
    println!("resume: open the store    {resume:.1} ms");
    println!("resume: first pass        {first_pass:.1} ms");
}

/// Long timeouts: nothing times out during the run.
const LIMITS: Limits = Limits {
    lost_timeout: Duration::from_secs(3600),
    join_timeout: Duration::from_secs(3600),
    unhealthy_timeout: Duration::from_secs(3600),
    drain_deadline: Duration::from_secs(120),
    heartbeat_every: Duration::from_secs(30),
    terminate_retry_after: Duration::from_secs(30),
    protect_after_work: Duration::from_secs(60),
    rebalance: Some(gru_core::rebalance::DEFAULT_REBALANCE),
};

fn report(seq: u64, healthy: bool) -> Report {
    Report {
        seq,
        queue_depth: seq % 5,
        in_flight: 1,
        processed_total: seq * 10,
        healthy,
        ..Default::default()
    }
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn group(n: usize) -> GroupState {
    GroupState {
        desired: n as u32,
        min: 0,
        max: (n * 2) as u32,
        instances: (0..n)
            .map(|k| Instance {
                id: InstanceId(format!("i-{k:08}")),
                lifecycle: InstanceLifecycle::InService,
                launched_at: SystemTime::now(),
            })
            .collect(),
    }
}

fn config(dir: &std::path::Path) -> ControllerConfig {
    let text = r#"
        listen = "127.0.0.1:0"
        join_token_file = "token"
        state_dir = "state"
        [tls]
        cert = "c.pem"
        key = "c.key"
        client_ca = "ca.pem"
        [[fleet]]
        name = "f"
        provider = "local"
        min = 0
        max = 100000
        [fleet.local]
        listen = "127.0.0.1:0"
        minion_config = "unused.toml"
    "#;
    ControllerConfig::parse(&dir.join("controller.toml"), text).expect("config")
}
