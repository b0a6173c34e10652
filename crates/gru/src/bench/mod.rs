//! `gru bench sink`, `gru bench drive`, `gru bench engine` and `gru bench
//! suite`: the origin's DRIVER, SINK and system under test over HL7/MLLP,
//! with a live progress line and a summary (table or JSON).

mod agent;
mod breach;
mod controller;
mod rebalance;
mod soak;
mod suite;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use gru_engine::bench::{
    self, Delivery, DriveConfig, DriveHandle, DriveSummary, SinkConfig, SinkHandle,
};
use gru_engine::synth::{MAX_MESSAGE_BYTES, Mix};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// An MLLP listener that ACKs and counts every message (the SINK).
    Sink(SinkArgs),
    /// Send synthetic HL7 messages to an MLLP endpoint and measure (the DRIVER).
    Drive(DriveArgs),
    /// Run the reference engine on its own (the system under test), for
    /// benchmarks: T1 pass-through, T2 or T4 with transforms.
    Engine(EngineArgs),
    /// Run the origin's four workloads (T1, T2, T4, T4 without ACK), in
    /// memory and durable, on this machine: DRIVER and SINKs in this
    /// process, the engine in a child process. Prints a table; fails if any
    /// SINK misses a message it should have.
    Suite(suite::SuiteArgs),
    /// Many messages through a `gru dev` fleet while it is scaled, its
    /// minions are killed and its controller is killed mid-drain; fails if
    /// an ACKed message never reached the downstream.
    Soak(soak::SoakArgs),
    /// What an idle minion agent costs its instance: CPU share and memory
    /// at a 1 s report interval, with the reference engine and with the
    /// exec adapter polling a stub engine.
    Agent(agent::AgentArgs),
    /// How long from a queue crossing its target on a minion to the
    /// controller's set-desired call: the real controller and agent in this
    /// process, over TLS on loopback, with a recording group.
    Breach(breach::BreachArgs),
    /// How many minions one controller holds: simulated agents (each its
    /// own TLS connection, Join and Session) ramp through the given counts
    /// against the real controller and against a bare gRPC server; prints
    /// CPU, memory, CPU per report and report-to-registry latency per step.
    Controller(controller::ControllerArgs),
    /// How soon a scale-out's new minions carry their share of long-lived
    /// connections, with the controller's rebalancing and with only the
    /// engines' max connection age: `gru dev` scaled from 1 minion out,
    /// again and again, under senders that keep their connections.
    Rebalance(rebalance::RebalanceArgs),
    /// The server under test of `gru bench controller`, in its own process.
    #[command(hide = true)]
    ControllerTarget(controller::TargetArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum Workload {
    /// One route, no transform: needs one --downstream.
    T1,
    /// One inbound, one transform, two outbound: needs two --downstream.
    T2,
    /// Four routes with transforms, five outbound: needs five --downstream.
    T4,
}

#[derive(Clone, Copy, ValueEnum)]
enum Ack {
    /// ACK upstream once every destination ACKed.
    AfterDelivery,
    /// ACK once queued (written to the queue directory when one is given).
    AfterEnqueue,
    /// Send no ACK at all.
    None,
}

#[derive(Args)]
pub struct EngineArgs {
    /// Where senders connect; port 0 picks a free one (printed on the first line).
    #[arg(long, default_value = "127.0.0.1:2575")]
    listen: SocketAddr,
    /// Where messages go on to; repeat for T2 (2) and T4 (5).
    #[arg(long, required = true)]
    downstream: Vec<SocketAddr>,
    #[arg(long, value_enum, default_value_t = Workload::T1)]
    workload: Workload,
    #[arg(long, value_enum, default_value_t = Ack::AfterDelivery)]
    ack: Ack,
    /// Keep the queue on disk here: what was ACKed survives a crash (use
    /// with --ack after-enqueue).
    #[arg(long)]
    queue_dir: Option<PathBuf>,
    /// Close connections at a message boundary after this age; 0s = never.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    max_connection_age: Duration,
    /// Downstream connections per destination.
    #[arg(long, default_value_t = gru_engine::engine::DEFAULT_FORWARDERS)]
    forwarders: usize,
    /// On Ctrl-C or SIGTERM, how long to finish and flush before stopping.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    stop_grace: Duration,
}

#[derive(Args)]
pub struct SinkArgs {
    /// Where to listen; port 0 picks a free one (printed on the first line).
    #[arg(long, default_value = "127.0.0.1:2576")]
    listen: SocketAddr,
    /// Wait this long before each ACK, to play a slow downstream system.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    ack_delay: Duration,
    /// Stop after this long (default: run until Ctrl-C or SIGTERM).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// On exit, write every control id (MSH-10) received, one per line.
    #[arg(long)]
    record: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct DriveArgs {
    /// The MLLP endpoint: an engine, or the load balancer in front of a fleet.
    #[arg(long)]
    target: SocketAddr,
    /// Messages per second over all connections; 0 = as fast as ACKs return.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// How long to send.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Concurrent sender connections (each sends one message, waits for its ACK).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Approximate message size in bytes, up to 1 MiB (1048576).
    #[arg(long, default_value_t = bench::DEFAULT_MESSAGE_BYTES, value_parser = parse_size)]
    size: usize,
    /// Message kinds and their weights, e.g. adt-a01=2,oru-r01=1 (kinds:
    /// adt-a01, adt-a08, oru-r01; default: all three equally).
    #[arg(long, default_value_t = Mix::default())]
    mix: Mix,
    /// Seed for the synthetic messages.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Do not wait for ACKs: stream messages (the no-ACK workload; pair with
    /// an engine that sends none). Delivery is then judged at the SINKs only.
    #[arg(long)]
    no_ack: bool,
    /// Run a SINK in this process on this address (repeat for several), and
    /// after sending, check that it received every message ACKed (or sent,
    /// with --no-ack): exits non-zero when one is missing. Point the
    /// engine's destinations here.
    #[arg(long = "sink", value_name = "ADDR")]
    sinks: Vec<SocketAddr>,
    /// With --sink: how long to wait for messages still on their way once no
    /// SINK received anything new.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    settle: Duration,
    /// On exit, write every control id that was ACKed (AA), one per line
    /// (with --no-ack: every one sent).
    #[arg(long)]
    record: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

/// A message size within what the synthetic generator makes.
fn parse_size(s: &str) -> Result<usize, String> {
    let n: usize = s
        .parse()
        .map_err(|_| format!("expected a number of bytes, got {s:?}"))?;
    if n > MAX_MESSAGE_BYTES {
        return Err(format!(
            "at most {MAX_MESSAGE_BYTES} bytes (1 MiB), got {n}"
        ));
    }
    Ok(n)
}

pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Sink(a) => sink(a).await,
        BenchCommand::Drive(a) => drive(a).await,
        BenchCommand::Engine(a) => engine(a).await,
        BenchCommand::Suite(a) => suite::run(a).await,
        BenchCommand::Soak(a) => soak::run(a).await,
        BenchCommand::Agent(a) => agent::run(a).await,
        BenchCommand::Breach(a) => breach::run(a).await,
        BenchCommand::Rebalance(a) => rebalance::run(a).await,
        BenchCommand::Controller(a) => controller::run(a).await,
        BenchCommand::ControllerTarget(a) => controller::target(a).await,
    }
}

/// Resolves on Ctrl-C, SIGTERM or SIGHUP (the terminal closed): for
/// `gru dev`, whose controller otherwise takes SIGHUP as "reload the TLS
/// files" and would outlive its terminal.
pub async fn interrupted_or_hung_up() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::hangup()) {
        Ok(mut hup) => tokio::select! {
            _ = interrupted() => {}
            _ = hup.recv() => {}
        },
        Err(_) => interrupted().await,
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn interrupted() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn write_lines(path: &Path, lines: &[String]) -> anyhow::Result<()> {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// A progress line on stderr, redrawn in place when stderr is a terminal.
fn progress(line: &str) {
    use std::io::{IsTerminal, Write};
    let mut err = std::io::stderr();
    if err.is_terminal() {
        let _ = write!(err, "\r\x1b[2K{line}");
    } else {
        let _ = writeln!(err, "{line}");
    }
    let _ = err.flush();
}

fn end_progress() {
    use std::io::IsTerminal;
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
}

async fn sink(a: SinkArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    let addr = listener.local_addr()?;
    println!("sink listening on {addr}");
    let stats = SinkHandle::new();
    let config = SinkConfig {
        ack_delay: a.ack_delay,
        ..Default::default()
    };
    let duration = a.duration;
    let stop = async move {
        match duration {
            Some(d) => tokio::select! { _ = tokio::time::sleep(d) => {}, _ = interrupted() => {} },
            None => interrupted().await,
        }
    };
    let run = bench::run_sink(listener, config, stats.clone(), stop);
    tokio::pin!(run);
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let summary = loop {
        tokio::select! {
            r = &mut run => break r?,
            _ = tick.tick() => {
                let n = stats.received();
                if n > 0 {
                    progress(&format!("sink {addr}: received {n} ({:.0} msg/s)", n as f64 / started.elapsed().as_secs_f64()));
                }
            }
        }
    };
    end_progress();
    if let Some(path) = &a.record {
        write_lines(path, &stats.control_ids())?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "sink: received {} messages ({} distinct) in {:.1}s",
            summary.received,
            summary.unique,
            summary.elapsed.as_secs_f64()
        );
    }
    Ok(())
}

/// Sinks run by the DRIVER's own process, so it can check them.
struct LocalSinks {
    addrs: Vec<SocketAddr>,
    handles: Vec<SinkHandle>,
    stop: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
}

impl LocalSinks {
    async fn start(addrs: &[SocketAddr]) -> anyhow::Result<Self> {
        let mut sinks = LocalSinks {
            addrs: Vec::new(),
            handles: Vec::new(),
            stop: CancellationToken::new(),
            tasks: tokio::task::JoinSet::new(),
        };
        for addr in addrs {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} for a sink"))?;
            sinks.addrs.push(listener.local_addr()?);
            let handle = SinkHandle::new();
            sinks.handles.push(handle.clone());
            let stop = sinks.stop.clone().cancelled_owned();
            sinks.tasks.spawn(async move {
                if let Err(e) = bench::run_sink(listener, SinkConfig::default(), handle, stop).await
                {
                    tracing::error!(error = %e, "sink failed");
                }
            });
        }
        Ok(sinks)
    }

    fn received(&self) -> Vec<u64> {
        self.handles.iter().map(SinkHandle::received).collect()
    }

    async fn shutdown(mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// What one SINK got, for the summary.
#[derive(Serialize)]
struct SinkReport {
    listen: SocketAddr,
    #[serde(flatten)]
    delivery: Delivery,
}

/// The driver's JSON summary: its own counters, and the SINKs' when it ran
/// them.
#[derive(Serialize)]
struct DriveReport<'a> {
    #[serde(flatten)]
    drive: &'a DriveSummary,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    sinks: Vec<SinkReport>,
    /// Distinct control ids that were ACKed (sent, without ACKs) yet are
    /// missing at a SINK, summed over the SINKs; absent without --sink.
    #[serde(skip_serializing_if = "Option::is_none")]
    lost: Option<u64>,
    /// Messages per second received by the slowest SINK, from the start of
    /// sending until delivery was complete.
    #[serde(skip_serializing_if = "Option::is_none")]
    received_per_sec: Option<f64>,
}

async fn drive(a: DriveArgs) -> anyhow::Result<()> {
    let sinks = LocalSinks::start(&a.sinks).await?;
    for addr in &sinks.addrs {
        eprintln!("sink listening on {addr}");
    }
    let config = DriveConfig {
        target: a.target,
        rate: (a.rate > 0.0).then_some(a.rate),
        duration: a.duration,
        connections: a.connections,
        seed: a.seed,
        message_bytes: a.size,
        reconnect_backoff: bench::DEFAULT_RECONNECT_BACKOFF,
        wait_for_ack: !a.no_ack,
        mix: a.mix,
    };
    let live = DriveHandle::new();
    let started = Instant::now();
    let summary = with_progress(
        bench::run_drive(config, live.clone(), interrupted()),
        |secs| {
            let mut line = format!(
                "drive {}: {secs:.0}s sent {} ({:.0} msg/s)",
                a.target,
                live.sent(),
                live.sent() as f64 / secs
            );
            if !a.no_ack {
                line += &format!(
                    " acked {} ({:.0} msg/s) nacked {}",
                    live.acked(),
                    live.acked() as f64 / secs,
                    live.nacked()
                );
            }
            line += &format!(" reconnects {} errors {}", live.reconnects(), live.errors());
            if !sinks.handles.is_empty() {
                line += &format!(" at sinks {:?}", sinks.received());
            }
            line
        },
    )
    .await?;
    let (deliveries, settled) = if sinks.handles.is_empty() {
        (Vec::new(), None)
    } else {
        let expected = summary.expected_at_sink();
        let d = with_progress(
            async { Ok(bench::await_delivery(&sinks.handles, expected, a.settle).await) },
            |_| {
                format!(
                    "waiting for the sinks: {:?} of {} received",
                    sinks.received(),
                    expected.len()
                )
            },
        )
        .await?;
        (d, Some(started.elapsed().as_secs_f64()))
    };
    let report = DriveReport {
        drive: &summary,
        lost: settled.map(|_| deliveries.iter().map(|d| d.missing).sum()),
        received_per_sec: settled
            .map(|secs| deliveries.iter().map(|d| d.unique).min().unwrap_or(0) as f64 / secs),
        sinks: sinks
            .addrs
            .iter()
            .zip(deliveries)
            .map(|(listen, delivery)| SinkReport {
                listen: *listen,
                delivery,
            })
            .collect(),
    };
    sinks.shutdown().await;
    if let Some(path) = &a.record {
        write_lines(path, summary.expected_at_sink())?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_drive(&report);
    }
    match report.lost {
        Some(lost) if lost > 0 => anyhow::bail!(
            "{lost} message(s) {} never reached a sink",
            if a.no_ack { "sent" } else { "ACKed" }
        ),
        _ => Ok(()),
    }
}

fn print_drive(r: &DriveReport<'_>) {
    let s = r.drive;
    println!(
        "sent {} ({:.1} msg/s)  acked {}  nacked {}  errors {}  reconnects {}  over {:.1}s",
        s.sent, s.sent_per_sec, s.acked, s.nacked, s.errors, s.reconnects, s.elapsed_secs
    );
    if s.wait_for_ack {
        println!(
            "{:.1} msg/s acked   latency p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
            s.acked_per_sec, s.latency_p50_ms, s.latency_p99_ms, s.latency_max_ms
        );
    } else {
        println!("no ACKs awaited (--no-ack): delivery is judged at the sinks");
    }
    for sink in &r.sinks {
        let d = &sink.delivery;
        println!(
            "sink {}: received {} ({} distinct, {} duplicates), missing {}",
            sink.listen, d.received, d.unique, d.duplicates, d.missing
        );
    }
    if let (Some(lost), Some(rate)) = (r.lost, r.received_per_sec) {
        let verdict = if lost == 0 {
            "every message reached every sink"
        } else {
            "MESSAGES LOST"
        };
        println!("{rate:.1} msg/s received at the slowest sink; lost {lost}: {verdict}");
    }
}

/// Runs `work`, redrawing a progress line from `line(seconds so far)` every
/// second until it finishes.
async fn with_progress<T>(
    work: impl std::future::Future<Output = Result<T, bench::BenchError>>,
    line: impl Fn(f64) -> String,
) -> anyhow::Result<T> {
    tokio::pin!(work);
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let out = loop {
        tokio::select! {
            r = &mut work => break r?,
            _ = tick.tick() => progress(&line(started.elapsed().as_secs_f64())),
        }
    };
    end_progress();
    Ok(out)
}

async fn engine(a: EngineArgs) -> anyhow::Result<()> {
    use gru_engine::routes::{self, AckMode};
    let d = &a.downstream;
    let routes = match (a.workload, d.len()) {
        (Workload::T1, 1) => Vec::new(),
        (Workload::T2, 2) => routes::t2_routes([d[0], d[1]]),
        (Workload::T4, 5) => routes::t4_routes([d[0], d[1], d[2], d[3], d[4]]),
        (w, n) => {
            let want = match w {
                Workload::T1 => 1,
                Workload::T2 => 2,
                Workload::T4 => 5,
            };
            anyhow::bail!("this workload needs {want} --downstream, got {n}");
        }
    };
    let config = gru_engine::EngineConfig {
        listen: a.listen,
        downstream: d[0],
        routes,
        ack_mode: match a.ack {
            Ack::AfterDelivery => AckMode::AfterDelivery,
            Ack::AfterEnqueue => AckMode::AfterEnqueue,
            Ack::None => AckMode::None,
        },
        queue_dir: a.queue_dir.clone(),
        max_connection_age: a.max_connection_age,
        forwarders: a.forwarders,
        ..Default::default()
    };
    let engine = gru_engine::start(config)
        .await
        .map_err(|e| anyhow::anyhow!(gru_core::error_chain(&e)))?;
    println!("engine listening on {}", engine.local_addr());
    let stop = interrupted();
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {
                let s = engine.status();
                progress(&format!(
                    "engine {}: processed {} failed {} queued {} in flight {} connections {}",
                    engine.local_addr(), s.processed, s.failed, s.queue_depth, s.in_flight, s.open_connections
                ));
            }
        }
    }
    end_progress();
    engine.shutdown(a.stop_grace).await;
    let s = engine.status();
    println!(
        "engine: processed {} failed {}; left queued {} in flight {}",
        s.processed, s.failed, s.queue_depth, s.in_flight
    );
    Ok(())
}
