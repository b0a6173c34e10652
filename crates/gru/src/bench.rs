//! `gru bench sink` and `gru bench drive`: the origin's DRIVER and SINK over
//! HL7/MLLP, with a live progress line and a summary (table or JSON).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use gru_engine::bench::{self, DriveConfig, DriveHandle, SinkConfig, SinkHandle};
use tokio::net::TcpListener;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// An MLLP listener that ACKs and counts every message (the SINK).
    Sink(SinkArgs),
    /// Send synthetic HL7 messages to an MLLP endpoint and measure (the DRIVER).
    Drive(DriveArgs),
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
