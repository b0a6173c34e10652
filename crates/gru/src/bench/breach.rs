//! `gru bench breach`: how long from a queue crossing its target on a
//! minion to the controller's call that sets the group's desired capacity.
//!
//! Each breach runs the real controller (in this process, over its real
//! gRPC API with TLS on loopback) and the real minion agent, whose engine is
//! a stub with a queue the benchmark sets. The group is a recorder: it
//! holds one instance and notes when `set_desired` is called. The queue
//! jumps past the target at a moment drawn at random against the agent's
//! report tick and the controller's evaluation tick; the time to the
//! recorded call is the figure. Report and evaluation intervals are the
//! controller's defaults (1 s each) unless given.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, anyhow, bail};
use async_trait::async_trait;
use clap::Args;
use gru_cloud::{
    CapacityGroup, CloudError, GroupState, Instance, InstanceId, InstanceLifecycle, Target,
    TargetGroup, TargetState,
};
use gru_controller::pki::DevPki;
use gru_controller::store::SqliteStore;
use gru_controller::{Controller, ControllerConfig, FleetRuntime};
use gru_core::MinionState;
use rand::Rng;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

use super::{end_progress, progress};

/// How long one breach may take to be acted on before the run fails.
const ACT_WITHIN: Duration = Duration::from_secs(15);
const TOKEN: &str = "bench-breach-token";
/// Queued messages per minion the policy aims at.
const TARGET: u64 = 4;

#[derive(Args)]
pub struct BreachArgs {
    /// How many breaches to measure.
    #[arg(long, default_value_t = 20)]
    breaches: usize,
    /// The minions' report interval.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    report_interval: Duration,
    /// The controller's evaluation interval.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    eval_interval: Duration,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
pub struct BreachReport {
    breaches: usize,
    report_interval_ms: u64,
    eval_interval_ms: u64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Every breach's time to the set-desired call, in milliseconds.
    samples_ms: Vec<f64>,
}

/// A group of one instance that records when its desired capacity is set.
struct Recorder {
    state: Mutex<GroupState>,
    calls: mpsc::UnboundedSender<(Instant, u32)>,
}

#[async_trait]
impl CapacityGroup for Recorder {
    async fn describe(&self) -> Result<GroupState, CloudError> {
        Ok(self.state.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
    async fn set_desired(&self, desired: u32) -> Result<(), CloudError> {
        let _ = self.calls.send((Instant::now(), desired));
        self.state.lock().unwrap_or_else(|p| p.into_inner()).desired = desired;
        Ok(())
    }
    async fn terminate(&self, _id: &InstanceId, _decrement: bool) -> Result<(), CloudError> {
        Ok(())
    }
}

#[async_trait]
impl TargetGroup for Recorder {
    async fn register(&self, _target: &Target) -> Result<(), CloudError> {
        Ok(())
    }
    async fn deregister(&self, _target: &Target) -> Result<(), CloudError> {
        Ok(())
    }
    async fn target_state(&self, _target: &Target) -> Result<TargetState, CloudError> {
        Ok(TargetState::Healthy)
    }
}

/// One breach on a fresh controller and agent: the time from the queue
/// crossing the target to the set-desired call.
async fn one(a: &BreachArgs, dir: &std::path::Path) -> anyhow::Result<Duration> {
    let pki = DevPki::in_dir(dir);
    pki.ensure().map_err(|e| anyhow!("{e}"))?;
    std::fs::write(dir.join("token"), TOKEN)?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let config = ControllerConfig::parse(
        &dir.join("controller.toml"),
        &format!(
            "listen = \"{addr}\"\nreport_interval = \"{}\"\neval_interval = \"{}\"\n\
             join_token_file = \"token\"\nstate_dir = \"state\"\n\
             [tls]\ncert = \"controller.pem\"\nkey = \"controller.key\"\nclient_ca = \"ca.pem\"\n\
             [[fleet]]\nname = \"bench\"\nprovider = \"local\"\nmin = 1\nmax = 10\n\
             target_queue_per_minion = {TARGET}\n\
             [fleet.local]\nlisten = \"127.0.0.1:0\"\nminion_config = \"unused.toml\"\n",
            humantime::format_duration(a.report_interval),
            humantime::format_duration(a.eval_interval),
        ),
    )
    .map_err(|e| anyhow!("{e}"))?;
    let (calls, mut called) = mpsc::unbounded_channel();
    let group = Arc::new(Recorder {
        state: Mutex::new(GroupState {
            desired: 1,
            min: 0,
            max: 10,
            instances: vec![Instance {
                id: InstanceId::from("i-bench"),
                lifecycle: InstanceLifecycle::InService,
                launched_at: SystemTime::now(),
            }],
        }),
        calls,
    });
    let fleet = FleetRuntime::new(config.fleets[0].clone(), group.clone(), group);
    let store = SqliteStore::open(&config.state_dir).map_err(|e| anyhow!("{e}"))?;
    let controller = Controller::new(config, vec![fleet], TOKEN.to_owned(), Arc::new(store))
        .map_err(|e| anyhow!("{e}"))?;
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(gru_controller::run(controller.clone(), listener, async {
        let _ = stopped.await;
    }));

    let minion = gru_minion::MinionConfig::parse(
        &dir.join("minion.toml"),
        &format!(
            "controller = \"https://{addr}\"\nca_file = \"ca.pem\"\nfleet = \"bench\"\n\
             join_token_file = \"token\"\n[engine]\nlisten = \"127.0.0.1:0\"\n\
             downstream = \"127.0.0.1:9\"\n"
        ),
    )
    .map_err(|e| anyhow!("{e}"))?;
    let engine = Arc::new(gru_minion::engine::FixedEngine::new(0));
    let agent = gru_minion::Agent::new(minion, "i-bench".to_owned(), engine.clone())
        .map_err(|e| anyhow!("{e}"))?;
    let (stop_agent, agent_stopped) = oneshot::channel::<()>();
    let agent = tokio::spawn(async move {
        agent
            .run(async {
                let _ = agent_stopped.await;
            })
            .await
    });

    // In service, reporting an empty queue.
    let started = Instant::now();
    loop {
        let in_service = controller.fleet("bench").is_some_and(|f| {
            f.registry()
                .minions()
                .any(|m| m.state() == MinionState::InService)
        });
        if in_service {
            break;
        }
        if started.elapsed() > ACT_WITHIN {
            bail!("the minion did not come into service");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Anything called so far (the first decision) is not the breach's.
    while called.try_recv().is_ok() {}
    // A moment at random against both ticks.
    let phase = a
        .report_interval
        .max(a.eval_interval)
        .mul_f64(rand::rng().random_range(0.0..1.0));
    tokio::time::sleep(a.report_interval + phase).await;
    while called.try_recv().is_ok() {}

    let breach = Instant::now();
    engine.set_queue(TARGET * 25);
    let latency = loop {
        let (at, desired) = tokio::time::timeout(ACT_WITHIN, called.recv())
            .await
            .context("no set-desired call after the breach")?
            .ok_or_else(|| anyhow!("the group is gone"))?;
        if desired > 1 {
            break at.saturating_duration_since(breach);
        }
    };
    let _ = stop_agent.send(());
    let _ = agent.await;
    let _ = stop.send(());
    let _ = server.await;
    Ok(latency)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub async fn run(a: BreachArgs) -> anyhow::Result<()> {
    if a.breaches == 0 {
        bail!("--breaches: at least 1");
    }
    gru_proto::install_crypto_provider();
    let mut samples = Vec::with_capacity(a.breaches);
    for i in 0..a.breaches {
        progress(&format!("breach {}/{}", i + 1, a.breaches));
        let dir = tempfile::tempdir()?;
        let d = one(&a, dir.path()).await?;
        samples.push(d.as_secs_f64() * 1000.0);
    }
    end_progress();
    let mut sorted = samples.clone();
    sorted.sort_by(f64::total_cmp);
    let report = BreachReport {
        breaches: a.breaches,
        report_interval_ms: a.report_interval.as_millis() as u64,
        eval_interval_ms: a.eval_interval.as_millis() as u64,
        p50_ms: percentile(&sorted, 0.50),
        p99_ms: percentile(&sorted, 0.99),
        max_ms: sorted.last().copied().unwrap_or(0.0),
        samples_ms: samples,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "breach -> set-desired call over {} breaches (report every {} ms, evaluate every {} ms): p50 {:.0} ms  p99 {:.0} ms  max {:.0} ms",
            report.breaches,
            report.report_interval_ms,
            report.eval_interval_ms,
            report.p50_ms,
            report.p99_ms,
            report.max_ms
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 10.0);
        assert_eq!(percentile(&v, 0.99), 20.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
    }
}
