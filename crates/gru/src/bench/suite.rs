//! `gru bench suite`: the origin's benchmark table on this machine.
//!
//! Each row starts fresh SINKs in this process, the reference engine as a
//! child process (`gru bench engine`, so the system under test has its own
//! runtime, as it would on its own host), drives it open-loop, then waits
//! until every SINK holds every message the DRIVER was promised (ACKed, or
//! sent in the no-ACK workload). A row with a missing message fails the run.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use gru_engine::bench::{self, DriveConfig, DriveHandle};
use gru_engine::synth::Mix;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::{LocalSinks, parse_size, with_progress};

/// How long the engine child may take to print its address.
const ENGINE_START_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SuiteWorkload {
    /// Pass-through: one route, no transform, one SINK.
    T1,
    /// "1-1-2 with transform": one route, one transform, two SINKs.
    T2,
    /// "1-4-5 with transform": four routes with transforms, five SINKs.
    T4,
    /// T4 with no ACKs at all: the DRIVER streams, the engine never answers.
    T4NoAck,
}

impl SuiteWorkload {
    fn sinks(self) -> usize {
        match self {
            SuiteWorkload::T1 => 1,
            SuiteWorkload::T2 => 2,
            SuiteWorkload::T4 | SuiteWorkload::T4NoAck => 5,
        }
    }

    fn engine_workload(self) -> &'static str {
        match self {
            SuiteWorkload::T1 => "t1",
            SuiteWorkload::T2 => "t2",
            SuiteWorkload::T4 | SuiteWorkload::T4NoAck => "t4",
        }
    }

    fn label(self) -> &'static str {
        match self {
            SuiteWorkload::T1 => "T1",
            SuiteWorkload::T2 => "T2",
            SuiteWorkload::T4 => "T4",
            SuiteWorkload::T4NoAck => "T4-no-ACK",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SuiteMode {
    /// Queue in memory; ACK once every destination ACKed.
    Memory,
    /// Write-ahead queue on disk (fsync batched); ACK once written.
    Durable,
}

#[derive(Args)]
pub struct SuiteArgs {
    /// How long each row sends.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// DRIVER connections.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Approximate message size in bytes, up to 1 MiB (1048576).
    #[arg(long, default_value_t = bench::DEFAULT_MESSAGE_BYTES, value_parser = parse_size)]
    size: usize,
    /// Message kinds and their weights, e.g. adt-a01=2,oru-r01=1.
    #[arg(long, default_value_t = Mix::default())]
    mix: Mix,
    /// Only these workloads (repeat or comma-separate; default: all four).
    #[arg(long = "workload", value_enum, value_delimiter = ',')]
    workloads: Vec<SuiteWorkload>,
    /// Only these modes (default: both).
    #[arg(long = "mode", value_enum, value_delimiter = ',')]
    modes: Vec<SuiteMode>,
    /// How long to wait for messages still on their way once no SINK
    /// received anything new.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    settle: Duration,
    /// Print the rows as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// One row of the table.
#[derive(Debug, Serialize)]
struct Row {
    workload: SuiteWorkload,
    mode: SuiteMode,
    sent: u64,
    acked: u64,
    sent_per_sec: f64,
    /// 0 in the no-ACK workload.
    acked_per_sec: f64,
    /// Distinct messages at the slowest SINK per second, from the start of
    /// sending until delivery was complete: the row's throughput.
    received_per_sec: f64,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
    latency_max_ms: f64,
    nacked: u64,
    errors: u64,
    /// Promised messages (ACKed, or sent without ACKs) missing at a SINK,
    /// summed over the SINKs. Must be 0.
    lost: u64,
    /// Received more than once, summed over the SINKs (allowed).
    duplicates: u64,
}

pub async fn run(a: SuiteArgs) -> anyhow::Result<()> {
    let workloads = if a.workloads.is_empty() {
        SuiteWorkload::value_variants().to_vec()
    } else {
        a.workloads.clone()
    };
    let modes = if a.modes.is_empty() {
        SuiteMode::value_variants().to_vec()
    } else {
        a.modes.clone()
    };
    let scratch = tempfile::tempdir().context("cannot create a directory for durable queues")?;
    if !a.json {
        println!(
            "{} cores; {:?} per row, {} connections, {} byte messages ({}); driver, engine and sinks share this machine",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            a.duration,
            a.connections,
            a.size,
            a.mix
        );
    }
    let mut rows = Vec::new();
    for &workload in &workloads {
        for &mode in &modes {
            let queue_dir = scratch.path().join(format!("{workload:?}-{mode:?}"));
            let row = run_row(&a, workload, mode, &queue_dir)
                .await
                .with_context(|| format!("{} {mode:?}", workload.label()))?;
            rows.push(row);
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print_table(&rows);
    }
    let lost: u64 = rows.iter().map(|r| r.lost).sum();
    if lost > 0 {
        anyhow::bail!("{lost} promised message(s) never reached a sink");
    }
    Ok(())
}

async fn run_row(
    a: &SuiteArgs,
    workload: SuiteWorkload,
    mode: SuiteMode,
    queue_dir: &Path,
) -> anyhow::Result<Row> {
    let any: Vec<SocketAddr> = vec![SocketAddr::from(([127, 0, 0, 1], 0)); workload.sinks()];
    let sinks = LocalSinks::start(&any).await?;
    let mut engine = start_engine(workload, mode, &sinks.addrs, queue_dir).await?;
    let target = engine.addr;
    let no_ack = workload == SuiteWorkload::T4NoAck;
    let config = DriveConfig {
        target,
        rate: None,
        duration: a.duration,
        connections: a.connections,
        message_bytes: a.size,
        mix: a.mix,
        wait_for_ack: !no_ack,
        ..DriveConfig::default()
    };
    let live = DriveHandle::new();
    let started = Instant::now();
    let label = format!("{} {mode:?}", workload.label());
    let drive = with_progress(
        bench::run_drive(config, live.clone(), super::interrupted()),
        |secs| {
            format!(
                "{label}: {secs:.0}s sent {} acked {} at sinks {:?}",
                live.sent(),
                live.acked(),
                sinks.received()
            )
        },
    );
    let summary = tokio::select! {
        s = drive => s?,
        status = engine.child.wait() => anyhow::bail!("the engine exited during the run ({})", status?),
    };
    let expected = summary.expected_at_sink();
    let deliveries = with_progress(
        async { Ok(bench::await_delivery(&sinks.handles, expected, a.settle).await) },
        |_| {
            format!(
                "{label}: waiting for the sinks: {:?} of {}",
                sinks.received(),
                expected.len()
            )
        },
    )
    .await?;
    let secs = started.elapsed().as_secs_f64();
    engine.stop().await;
    sinks.shutdown().await;
    let slowest = deliveries.iter().map(|d| d.unique).min().unwrap_or(0);
    Ok(Row {
        workload,
        mode,
        sent: summary.sent,
        acked: summary.acked,
        sent_per_sec: summary.sent_per_sec,
        acked_per_sec: summary.acked_per_sec,
        received_per_sec: slowest as f64 / secs,
        latency_p50_ms: summary.latency_p50_ms,
        latency_p99_ms: summary.latency_p99_ms,
        latency_max_ms: summary.latency_max_ms,
        nacked: summary.nacked,
        errors: summary.errors,
        lost: deliveries.iter().map(|d| d.missing).sum(),
        duplicates: deliveries.iter().map(|d| d.duplicates).sum(),
    })
}

/// The engine under test, a child `gru bench engine`.
struct EngineChild {
    child: Child,
    addr: SocketAddr,
}

impl EngineChild {
    async fn stop(mut self) {
        // Delivery was checked already: nothing is left to flush.
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

async fn start_engine(
    workload: SuiteWorkload,
    mode: SuiteMode,
    sinks: &[SocketAddr],
    queue_dir: &Path,
) -> anyhow::Result<EngineChild> {
    let exe = std::env::current_exe().context("cannot find the gru executable")?;
    let mut cmd = Command::new(exe);
    cmd.args(["bench", "engine", "--listen", "127.0.0.1:0", "--workload"])
        .arg(workload.engine_workload());
    for s in sinks {
        cmd.arg("--downstream").arg(s.to_string());
    }
    let ack = match (workload, mode) {
        (SuiteWorkload::T4NoAck, _) => "none",
        (_, SuiteMode::Memory) => "after-delivery",
        (_, SuiteMode::Durable) => "after-enqueue",
    };
    cmd.args(["--ack", ack]);
    if mode == SuiteMode::Durable {
        cmd.arg("--queue-dir").arg(queue_dir);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let mut child = cmd.spawn().context("cannot start gru bench engine")?;
    let stdout = child.stdout.take().context("engine stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let first = tokio::time::timeout(ENGINE_START_TIMEOUT, lines.next_line())
        .await
        .context("the engine did not print its address in time")?
        .context("cannot read the engine's output")?
        .context("the engine exited before listening")?;
    let addr = first
        .rsplit(' ')
        .next()
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("unexpected first line from the engine: {first:?}"))?;
    // Keep draining its progress lines so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(EngineChild { child, addr })
}

fn print_table(rows: &[Row]) {
    let mut table = comfy_table::Table::new();
    table
        .load_preset(comfy_table::presets::NOTHING)
        .set_header([
            "workload", "mode", "msg/s", "acked/s", "p50 ms", "p99 ms", "max ms", "nacked",
            "errors", "lost", "dups",
        ]);
    for r in rows {
        let acked = r.workload != SuiteWorkload::T4NoAck;
        let ms = |v: f64| {
            if acked {
                format!("{v:.2}")
            } else {
                "-".to_owned()
            }
        };
        table.add_row([
            r.workload.label().to_owned(),
            format!("{:?}", r.mode).to_lowercase(),
            format!("{:.0}", r.received_per_sec),
            if acked {
                format!("{:.0}", r.acked_per_sec)
            } else {
                "-".to_owned()
            },
            ms(r.latency_p50_ms),
            ms(r.latency_p99_ms),
            ms(r.latency_max_ms),
            r.nacked.to_string(),
            r.errors.to_string(),
            r.lost.to_string(),
            r.duplicates.to_string(),
        ]);
    }
    println!("{table}");
    println!(
        "msg/s: distinct messages at the slowest sink per second, sending start to complete delivery"
    );
    for mode in SuiteMode::value_variants() {
        let rate = |w| {
            rows.iter()
                .find(|r| r.workload == w && r.mode == *mode)
                .map(|r| r.received_per_sec)
        };
        if let (Some(t1), Some(t4)) = (rate(SuiteWorkload::T1), rate(SuiteWorkload::T4))
            && t1 > 0.0
        {
            let no_ack = rate(SuiteWorkload::T4NoAck)
                .map(|r| format!(", T4-no-ACK/T1 {:.2}", r / t1))
                .unwrap_or_default();
            println!(
                "{}: T4/T1 {:.2}{no_ack}",
                format!("{mode:?}").to_lowercase(),
                t4 / t1
            );
        }
    }
}
