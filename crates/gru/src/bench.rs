//! `gru bench sink` and `gru bench drive`: the origin's DRIVER and SINK over
//! HL7/MLLP, with a live progress line and a summary (table or JSON).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use gru_engine::bench::{self, DriveConfig, DriveHandle, SinkConfig, SinkHandle};
use tokio::net::TcpListener;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// An MLLP listener that ACKs and counts every message (the SINK).
    Sink(SinkArgs),
    /// Send synthetic HL7 messages to an MLLP endpoint and measure (the DRIVER).
    Drive(DriveArgs),
    /// Run the reference engine on its own (the system under test), for
    /// benchmarks: T1 pass-through, T2 or T4 with transforms.
    Engine(EngineArgs),
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
    /// Approximate message size in bytes.
    #[arg(long, default_value_t = bench::DEFAULT_MESSAGE_BYTES)]
    size: usize,
    /// Seed for the synthetic messages.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// On exit, write every control id that was ACKed (AA), one per line.
    #[arg(long)]
    record: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Sink(a) => sink(a).await,
        BenchCommand::Drive(a) => drive(a).await,
        BenchCommand::Engine(a) => engine(a).await,
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

async fn drive(a: DriveArgs) -> anyhow::Result<()> {
    let config = DriveConfig {
        target: a.target,
        rate: (a.rate > 0.0).then_some(a.rate),
        duration: a.duration,
        connections: a.connections,
        seed: a.seed,
        message_bytes: a.size,
        reconnect_backoff: bench::DEFAULT_RECONNECT_BACKOFF,
    };
    let live = DriveHandle::new();
    let run = bench::run_drive(config, live.clone(), interrupted());
    tokio::pin!(run);
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let summary = loop {
        tokio::select! {
            r = &mut run => break r?,
            _ = tick.tick() => {
                let secs = started.elapsed().as_secs_f64();
                progress(&format!(
                    "drive {}: {:.0}s sent {} acked {} ({:.0} msg/s) nacked {} reconnects {} errors {}",
                    a.target, secs, live.sent(), live.acked(), live.acked() as f64 / secs,
                    live.nacked(), live.reconnects(), live.errors()
                ));
            }
        }
    };
    end_progress();
    if let Some(path) = &a.record {
        write_lines(path, &summary.acked_control_ids)?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "sent {}  acked {}  nacked {}  errors {}  reconnects {}\n{:.1} msg/s acked over {:.1}s   latency p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
            summary.sent,
            summary.acked,
            summary.nacked,
            summary.errors,
            summary.reconnects,
            summary.acked_per_sec,
            summary.elapsed_secs,
            summary.latency_p50_ms,
            summary.latency_p99_ms,
            summary.latency_max_ms
        );
    }
    Ok(())
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
