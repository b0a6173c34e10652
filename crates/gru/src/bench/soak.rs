//! `gru bench soak`: many messages through a running fleet while capacity
//! comes and goes, and the count of what was lost.
//!
//! It runs `gru dev` as a child (controller, local minions, load balancer),
//! a SINK as the fleet's downstream and a DRIVER at a steady rate, both in
//! this process. Over the run it pins the fleet at new sizes (scale events),
//! kills minion processes with SIGKILL (as the cloud may kill an instance)
//! and kills `gru dev` itself with SIGKILL while a minion drains (the
//! controller and the load balancer die together; the minions live on and
//! are adopted by the `gru dev` started again on the same state directory).
//! At the end every control id the DRIVER got an ACK for must be at the
//! SINK: the run fails if one is not.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::Args;
use gru_engine::bench::{self, DriveConfig, DriveHandle, SinkConfig, SinkHandle};
use serde::Serialize;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use super::{end_progress, progress};

/// How long `gru dev` may take to come up (or back).
const DEV_START: Duration = Duration::from_secs(60);
/// How long a scale-in may take to put a minion into its drain.
const DRAIN_START: Duration = Duration::from_secs(30);
/// How long after the DRIVER the SINK may take to hold every ACKed message.
const SETTLE: Duration = Duration::from_secs(60);

#[derive(Args)]
pub struct SoakArgs {
    /// Messages to send in all.
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    /// Messages per second over all connections.
    #[arg(long, default_value_t = 2000.0)]
    rate: f64,
    /// Sender connections (each waits for its ACK before the next message).
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Times the fleet is pinned at a new size, spread over the run.
    #[arg(long, default_value_t = 20)]
    scale_events: u32,
    /// The sizes it is pinned at, in turn (the fleet starts at the first).
    #[arg(long, value_delimiter = ',', default_value = "2,4,1,3")]
    sizes: Vec<u32>,
    /// Minion processes killed with SIGKILL, spread over the run.
    #[arg(long, default_value_t = 3)]
    minion_kills: u32,
    /// Times `gru dev` (controller and load balancer) is killed with
    /// SIGKILL while a minion drains, at scale-ins spread over the run.
    #[arg(long, default_value_t = 2)]
    controller_kills: u32,
    /// Where `gru dev` keeps its state and log (default: a new temporary
    /// directory, removed at the end).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// One thing the soak did to the fleet.
#[derive(Clone, Debug, Serialize)]
pub struct SoakEvent {
    /// Seconds since the DRIVER started.
    at_secs: f64,
    /// `scale`, `minion-kill` or `controller-kill`.
    kind: &'static str,
    detail: String,
}

#[derive(Debug, Serialize)]
pub struct SoakReport {
    sent: u64,
    acked: u64,
    nacked: u64,
    /// Distinct control ids at the SINK.
    delivered: u64,
    /// ACKed and not at the SINK: must be 0.
    acked_not_delivered: u64,
    /// Messages the SINK received more than once (resent after a broken
    /// connection: at-least-once).
    duplicates: u64,
    /// DRIVER errors: failed connects and broken connections while the load
    /// balancer was down or a minion died.
    errors: u64,
    reconnects: u64,
    scale_events: u32,
    minion_kills: u32,
    controller_kills: u32,
    elapsed_secs: f64,
    events: Vec<SoakEvent>,
}

/// What to do at a point of the run.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Step {
    Scale { size: u32, kill_controller: bool },
    KillMinion,
}

/// The run's timeline: scale events evenly spread, minion kills between
/// them, controller kills on the scale-ins spread evenly among them.
fn timeline(a: &SoakArgs, duration: Duration) -> anyhow::Result<Vec<(Duration, Step)>> {
    if a.sizes.is_empty() || a.sizes.contains(&0) {
        bail!("--sizes: sizes of at least 1, like 2,4,1,3");
    }
    let mut current = a.sizes[0];
    let mut scales = Vec::new();
    for i in 0..a.scale_events {
        let size = a.sizes[(i as usize + 1) % a.sizes.len()];
        scales.push((size, size < current));
        current = size;
    }
    let scale_ins: Vec<usize> = (0..scales.len()).filter(|i| scales[*i].1).collect();
    if (a.controller_kills as usize) > scale_ins.len() {
        bail!(
            "--controller-kills {}: only {} of the {} scale events are scale-ins (each kill lands mid-drain); raise --scale-events or change --sizes",
            a.controller_kills,
            scale_ins.len(),
            a.scale_events
        );
    }
    let kill_at: HashSet<usize> = (0..a.controller_kills as usize)
        .map(|k| scale_ins[(k * scale_ins.len()) / a.controller_kills as usize])
        .collect();
    let mut steps = Vec::new();
    let slot = duration / (a.scale_events + 1);
    for (i, (size, _)) in scales.iter().enumerate() {
        steps.push((
            slot * (i as u32 + 1),
            Step::Scale {
                size: *size,
                kill_controller: kill_at.contains(&i),
            },
        ));
    }
    for k in 0..a.minion_kills {
        // Spread like the scale events, half a slot off them, so a kill is
        // on its own.
        let j = ((k + 1) * (a.scale_events + 1)) / (a.minion_kills + 1);
        steps.push((slot * j + slot / 2, Step::KillMinion));
    }
    steps.sort_by_key(|(at, _)| *at);
    Ok(steps)
}

/// `gru dev` as a child, and how to reach it.
pub(super) struct Dev {
    child: Child,
    state: PathBuf,
    args: Vec<String>,
    listen: String,
    pub(super) lb: String,
    client_config: PathBuf,
}

impl Dev {
    pub(super) async fn start(
        state: &Path,
        args: Vec<String>,
        listen: &str,
        lb: &str,
    ) -> anyhow::Result<Dev> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(state.join("gru-dev.log"))
            .context("cannot open the gru dev log")?;
        let info = state.join("state/dev.json");
        let _ = std::fs::remove_file(&info);
        let program = std::env::current_exe().context("cannot find the gru binary")?;
        let mut child = Command::new(program)
            .arg("dev")
            .args(["--listen", listen, "--lb-listen", lb, "--state-dir"])
            .arg(state.join("state"))
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start gru dev")?;
        let started = Instant::now();
        let dev: Value = loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "gru dev exited with {status}; see {}",
                    state.join("gru-dev.log").display()
                );
            }
            if let Some(v) = std::fs::read_to_string(&info)
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            {
                break v;
            }
            if started.elapsed() > DEV_START {
                bail!("gru dev did not come up within {DEV_START:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let field = |k: &str| {
            dev[k]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| anyhow!("dev.json has no {k}"))
        };
        Ok(Dev {
            child,
            state: state.to_owned(),
            args,
            listen: field("controller")?
                .trim_start_matches("https://")
                .to_owned(),
            lb: field("load_balancer")?,
            client_config: field("client_config")?.into(),
        })
    }

    /// SIGKILL, as a crash would; the minions live on.
    async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }

    /// `gru dev` again on the same state directory and addresses.
    async fn restart(self) -> anyhow::Result<Dev> {
        Dev::start(&self.state, self.args.clone(), &self.listen, &self.lb).await
    }

    /// SIGTERM, and its exit: it stops every minion.
    pub(super) async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            // A pid of our own child, not yet reaped.
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        match tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await {
            Ok(status) => {
                status?;
                Ok(())
            }
            Err(_) => {
                self.child.start_kill()?;
                bail!("gru dev did not stop within 60s of SIGTERM")
            }
        }
    }

    /// Runs `gru ARGS --json` against this `gru dev` and parses its output.
    async fn cli(&self, args: &[&str]) -> anyhow::Result<Value> {
        let program = std::env::current_exe()?;
        let out = Command::new(program)
            .args(args)
            .arg("--config")
            .arg(&self.client_config)
            .arg("--json")
            .output()
            .await?;
        if !out.status.success() {
            bail!(
                "gru {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// `cli`, tried again for a while (the controller may be coming back).
    pub(super) async fn cli_retrying(&self, args: &[&str]) -> anyhow::Result<Value> {
        let started = Instant::now();
        loop {
            match self.cli(args).await {
                Ok(v) => return Ok(v),
                Err(e) if started.elapsed() > DEV_START => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }

    /// The minions' states by id.
    pub(super) async fn minions(&self) -> anyhow::Result<Vec<Value>> {
        let v = self.cli_retrying(&["minion", "ls"]).await?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// The pid of a live local minion process, from the local provider's
    /// state file.
    fn a_minion_pid(&self) -> Option<(String, i32)> {
        let text = std::fs::read_to_string(self.state.join("state/local-instances.json")).ok()?;
        let v: Value = serde_json::from_str(&text).ok()?;
        v["groups"]["local"].as_array()?.iter().find_map(|i| {
            let pid = i32::try_from(i["pid"].as_i64()?).ok()?;
            let alive = !i["terminating"].as_bool().unwrap_or(false)
                && Path::new(&format!("/proc/{pid}")).exists();
            alive.then(|| (i["id"].as_str().unwrap_or("?").to_owned(), pid))
        })
    }
}

pub async fn run(a: SoakArgs) -> anyhow::Result<()> {
    if a.messages == 0 || a.rate <= 0.0 || a.connections == 0 {
        bail!("--messages, --rate and --connections must be above 0");
    }
    let duration = Duration::from_secs_f64(a.messages as f64 / a.rate);
    let steps = timeline(&a, duration)?;
    let temp;
    let state = match &a.state_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_owned()
        }
    };

    // The fleet's downstream.
    let sink_listener = TcpListener::bind("127.0.0.1:0").await?;
    let sink_addr = sink_listener.local_addr()?;
    let sink = SinkHandle::new();
    let sink_stop = CancellationToken::new();
    let sink_task = tokio::spawn(bench::run_sink(
        sink_listener,
        SinkConfig::default(),
        sink.clone(),
        sink_stop.clone().cancelled_owned(),
    ));

    let max = a.sizes.iter().copied().max().unwrap_or(1);
    let first = a.sizes[0];
    let dev_args: Vec<String> = [
        "--min",
        "1",
        "--max",
        &max.to_string(),
        "--downstream",
        &sink_addr.to_string(),
        // Senders spread over new minions within seconds of a scale-out.
        "--max-connection-age",
        "2s",
        "--no-metrics",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut dev = Dev::start(&state, dev_args, "127.0.0.1:0", "127.0.0.1:0").await?;
    let in_service =
        |minions: &[Value]| minions.iter().filter(|m| m["state"] == "InService").count() as u32;
    dev.cli_retrying(&["scale", "local", &first.to_string()])
        .await?;
    let started = Instant::now();
    while in_service(&dev.minions().await?) != first {
        if started.elapsed() > DEV_START {
            bail!("the fleet did not reach {first} minions in service");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let lb: SocketAddr = dev.lb.parse().context("load balancer address")?;
    let live = DriveHandle::new();
    // The rate falls behind while the load balancer is down (a controller
    // kill): send until --messages have gone, not for a fixed time.
    let config = DriveConfig {
        target: lb,
        rate: Some(a.rate),
        duration: duration * 3,
        connections: a.connections,
        ..DriveConfig::default()
    };
    let enough = {
        let live = live.clone();
        let target = a.messages;
        async move {
            while live.sent() < target {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let driver = tokio::spawn(bench::run_drive(config, live.clone(), enough));
    let t0 = Instant::now();
    let mut events = Vec::new();
    let mut record = |kind: &'static str, detail: String| {
        let e = SoakEvent {
            at_secs: t0.elapsed().as_secs_f64(),
            kind,
            detail,
        };
        end_progress();
        eprintln!("{:>7.1}s  {}  {}", e.at_secs, e.kind, e.detail);
        events.push(e);
    };
    let mut counts = (0u32, 0u32, 0u32);
    for (at, step) in steps {
        while t0.elapsed() < at {
            tokio::time::sleep(Duration::from_millis(500).min(at - t0.elapsed())).await;
            progress(&format!(
                "soak {:.0}s/{:.0}s: sent {}/{} acked {} at the sink {}",
                t0.elapsed().as_secs_f64(),
                duration.as_secs_f64(),
                live.sent(),
                a.messages,
                live.acked(),
                sink.unique_received()
            ));
        }
        match step {
            Step::Scale {
                size,
                kill_controller,
            } => {
                dev.cli_retrying(&["scale", "local", &size.to_string()])
                    .await?;
                counts.0 += 1;
                record("scale", format!("pinned at {size}"));
                if kill_controller {
                    let phase = wait_for_drain(&dev).await?;
                    dev.kill().await?;
                    counts.2 += 1;
                    record(
                        "controller-kill",
                        format!("gru dev killed while a minion was {phase}"),
                    );
                    dev = dev.restart().await?;
                }
            }
            Step::KillMinion => match dev.a_minion_pid() {
                Some((id, pid)) => {
                    let _ = std::process::Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .status();
                    counts.1 += 1;
                    record("minion-kill", format!("{id} (pid {pid}) killed"));
                }
                None => record("minion-kill", "no live minion to kill".to_owned()),
            },
        }
    }
    let drive = driver.await.context("the driver panicked")??;
    end_progress();

    // Every ACK was given after the downstream ACKed: the SINK should hold
    // them all at once; give stragglers a moment.
    let settle = Instant::now();
    let missing = loop {
        let missing: Vec<&String> = drive
            .acked_control_ids
            .iter()
            .filter(|id| !sink.contains(id))
            .collect();
        if missing.is_empty() || settle.elapsed() > SETTLE {
            break missing.len() as u64;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    dev.stop().await?;
    sink_stop.cancel();
    let _ = sink_task.await;

    let report = SoakReport {
        sent: drive.sent,
        acked: drive.acked,
        nacked: drive.nacked,
        delivered: sink.unique_received(),
        acked_not_delivered: missing,
        duplicates: sink.received() - sink.unique_received(),
        errors: drive.errors,
        reconnects: drive.reconnects,
        scale_events: counts.0,
        minion_kills: counts.1,
        controller_kills: counts.2,
        elapsed_secs: t0.elapsed().as_secs_f64(),
        events,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    if report.acked_not_delivered > 0 {
        bail!(
            "{} ACKed message(s) never reached the sink",
            report.acked_not_delivered
        );
    }
    Ok(())
}

/// Waits until a minion is in one of its drain phases; returns the phase.
async fn wait_for_drain(dev: &Dev) -> anyhow::Result<String> {
    let started = Instant::now();
    loop {
        for m in dev.minions().await? {
            if let Some(state) = m["state"].as_str()
                && state.starts_with("Draining/")
            {
                return Ok(state.to_owned());
            }
        }
        if started.elapsed() > DRAIN_START {
            bail!("no minion started draining within {DRAIN_START:?} of a scale-in");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn print_report(r: &SoakReport) {
    println!(
        "sent {}  ACKed {}  NACKed {}  delivered {} (distinct)  duplicates {}",
        r.sent, r.acked, r.nacked, r.delivered, r.duplicates
    );
    println!("ACKed but not delivered: {}", r.acked_not_delivered);
    println!(
        "scale events {}  minions killed {}  controller kills {}  driver errors {}  reconnects {}  over {:.0}s",
        r.scale_events, r.minion_kills, r.controller_kills, r.errors, r.reconnects, r.elapsed_secs
    );
    for e in &r.events {
        println!("  {:>7.1}s  {:<16} {}", e.at_secs, e.kind, e.detail);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(scale_events: u32, controller_kills: u32, minion_kills: u32) -> SoakArgs {
        SoakArgs {
            messages: 1000,
            rate: 10.0,
            connections: 1,
            scale_events,
            sizes: vec![2, 4, 1, 3],
            minion_kills,
            controller_kills,
            state_dir: None,
            json: false,
        }
    }

    #[test]
    fn the_timeline_spreads_events_and_kills_the_controller_only_on_scale_ins() {
        let steps = timeline(&args(8, 2, 3), Duration::from_secs(90)).unwrap();
        let scales: Vec<(u32, bool)> = steps
            .iter()
            .filter_map(|(_, s)| match s {
                Step::Scale {
                    size,
                    kill_controller,
                } => Some((*size, *kill_controller)),
                Step::KillMinion => None,
            })
            .collect();
        // From 2: 4 (out), 1 (in), 3 (out), 2 (in), 4, 1, 3, 2.
        assert_eq!(
            scales.iter().map(|s| s.0).collect::<Vec<_>>(),
            [4, 1, 3, 2, 4, 1, 3, 2]
        );
        let kills: Vec<usize> = (0..scales.len()).filter(|i| scales[*i].1).collect();
        assert_eq!(kills.len(), 2);
        for k in &kills {
            let before = if *k == 0 { 2 } else { scales[k - 1].0 };
            assert!(scales[*k].0 < before, "a kill lands on a scale-in");
        }
        assert_eq!(
            steps.iter().filter(|(_, s)| *s == Step::KillMinion).count(),
            3
        );
        assert!(steps.windows(2).all(|w| w[0].0 <= w[1].0), "in time order");
        assert!(steps.iter().all(|(at, _)| *at < Duration::from_secs(90)));
    }

    #[test]
    fn more_controller_kills_than_scale_ins_is_refused() {
        let e = timeline(&args(2, 2, 0), Duration::from_secs(10)).unwrap_err();
        assert!(
            e.to_string().contains("only 1 of the 2 scale events"),
            "{e}"
        );
    }
}
