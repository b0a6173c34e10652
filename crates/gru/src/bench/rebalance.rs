//! `gru bench rebalance`: how soon a scale-out's new minions carry their
//! share of long-lived connections, with the controller's rebalancing and
//! without it (the engines' `max_connection_age` alone).
//!
//! Per mode it runs `gru dev` as a child with a slow built-in downstream,
//! so one minion is the bottleneck, and a DRIVER in this process whose
//! senders keep their connections and wait for each ACK (open loop). Each
//! scale-out pins the fleet at 1 until that minion holds every connection,
//! then at `--to`; it then watches the minions (`gru minion ls`) for
//! `--window`. For each new minion: from its InService transition (the
//! controller's clock) to the first listing that shows it holding its share
//! of the connections (`--connections / --to`, rounded down). Connection
//! counts come from the minions' reports, so a time includes up to one
//! report interval (1 s) and one listing (about 0.25 s) of staleness. The
//! DRIVER's ACKs over the window give the fleet's throughput after the
//! scale-out, beside its rate on one minion just before it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use gru_engine::bench::{self, DriveConfig, DriveHandle};
use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::soak::Dev;
use super::{end_progress, progress};

/// How long the fleet may take to settle on one minion holding every
/// connection between scale-outs.
const SETTLE: Duration = Duration::from_secs(180);
/// The one-minion rate is measured over this, just before a scale-out.
const BEFORE: Duration = Duration::from_secs(5);
/// How often the minions are listed.
const POLL: Duration = Duration::from_millis(250);

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// The controller asks minions above their share to shed connections.
    Rebalance,
    /// Rebalancing off: only the engines' --max-connection-age moves senders.
    Age,
}

#[derive(Args)]
pub struct RebalanceArgs {
    /// Scale-outs per mode.
    #[arg(long, default_value_t = 10)]
    scale_outs: u32,
    /// Sender connections, held for the whole run.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Each scale-out goes from 1 minion to this many.
    #[arg(long, default_value_t = 4)]
    to: u32,
    /// How long each scale-out is watched (throughput is over this window).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    window: Duration,
    /// The engines close connections after this age (jittered up to twice
    /// it), in both modes.
    #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
    max_connection_age: Duration,
    /// The built-in downstream waits this long before each ACK, so one
    /// minion's forwarders are the bottleneck.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    sink_ack_delay: Duration,
    /// The modes to run, in order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "rebalance,age"
    )]
    modes: Vec<Mode>,
    /// Where `gru dev` keeps its state and log (default: a new temporary
    /// directory, removed at the end).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// One mode's figures.
#[derive(Debug, Serialize)]
pub struct ModeReport {
    mode: Mode,
    scale_outs: u32,
    /// New minions watched (scale-outs × (to − 1)).
    new_minions: usize,
    /// Of them, those that held their share within the window.
    reached_share: usize,
    /// InService to holding the share, over those that reached it.
    time_to_share_p50_secs: Option<f64>,
    time_to_share_max_secs: Option<f64>,
    /// Every time measured, in order.
    times_to_share_secs: Vec<f64>,
    /// The fleet's ACKs per second on one minion, just before each
    /// scale-out (mean).
    before_msgs_per_sec: f64,
    /// Over the window after each scale-out (mean).
    window_msgs_per_sec: f64,
    /// DRIVER totals over the mode's run.
    acked: u64,
    nacked: u64,
    errors: u64,
    reconnects: u64,
}

#[derive(Debug, Serialize)]
pub struct RebalanceReport {
    connections: usize,
    to: u32,
    window_secs: f64,
    max_connection_age_secs: f64,
    sink_ack_delay_ms: f64,
    modes: Vec<ModeReport>,
}

pub async fn run(a: RebalanceArgs) -> anyhow::Result<()> {
    if a.scale_outs == 0 || a.connections == 0 || a.to < 2 || a.modes.is_empty() {
        bail!("--scale-outs and --connections must be above 0, --to at least 2, --modes not empty");
    }
    if (a.connections as u64) < u64::from(a.to) {
        bail!(
            "--connections {} over --to {}: fewer connections than minions leaves a minion no share",
            a.connections,
            a.to
        );
    }
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
    let mut modes = Vec::new();
    for mode in &a.modes {
        let dir = state.join(format!("{mode:?}").to_lowercase());
        std::fs::create_dir_all(&dir)?;
        modes.push(run_mode(&a, *mode, &dir).await?);
    }
    end_progress();
    let report = RebalanceReport {
        connections: a.connections,
        to: a.to,
        window_secs: a.window.as_secs_f64(),
        max_connection_age_secs: a.max_connection_age.as_secs_f64(),
        sink_ack_delay_ms: a.sink_ack_delay.as_secs_f64() * 1e3,
        modes,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

async fn run_mode(a: &RebalanceArgs, mode: Mode, state: &Path) -> anyhow::Result<ModeReport> {
    let mut args: Vec<String> = [
        "--min",
        "1",
        "--max",
        &a.to.to_string(),
        "--max-connection-age",
        &humantime::format_duration(a.max_connection_age).to_string(),
        "--sink-ack-delay",
        &humantime::format_duration(a.sink_ack_delay).to_string(),
        "--no-metrics",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if mode == Mode::Age {
        args.push("--no-rebalance".to_owned());
    }
    let dev = Dev::start(state, args, "127.0.0.1:0", "127.0.0.1:0").await?;
    let result = scale_outs(a, mode, &dev).await;
    let stopped = dev.stop().await;
    let report = result?;
    stopped?;
    Ok(report)
}

async fn scale_outs(a: &RebalanceArgs, mode: Mode, dev: &Dev) -> anyhow::Result<ModeReport> {
    let lb: SocketAddr = dev.lb.parse().context("load balancer address")?;
    let live = DriveHandle::new();
    let stop = CancellationToken::new();
    let config = DriveConfig {
        target: lb,
        rate: None,
        // Until stopped.
        duration: Duration::from_secs(7 * 24 * 3600),
        connections: a.connections,
        ..DriveConfig::default()
    };
    let driver = tokio::spawn(bench::run_drive(
        config,
        live.clone(),
        stop.clone().cancelled_owned(),
    ));
    let share = (a.connections as u64) / u64::from(a.to);
    let mut times = Vec::new();
    let mut new_minions = 0;
    let mut before = Vec::new();
    let mut window = Vec::new();
    for i in 1..=a.scale_outs {
        let label = format!("{mode:?} {i}/{}", a.scale_outs).to_lowercase();
        let survivor = settle_on_one(a, dev, &label).await?;
        let acked = live.acked();
        tokio::time::sleep(BEFORE).await;
        before.push((live.acked() - acked) as f64 / BEFORE.as_secs_f64());

        dev.cli_retrying(&["scale", "local", &a.to.to_string()])
            .await?;
        let started = Instant::now();
        let acked = live.acked();
        let mut reached: Vec<(String, f64)> = Vec::new();
        let mut seen: Vec<String> = Vec::new();
        while started.elapsed() < a.window {
            let now_ms = unix_ms(SystemTime::now());
            for m in dev.minions().await? {
                let id = m["id"].as_str().unwrap_or_default().to_owned();
                if id == survivor || m["state"] != "InService" {
                    continue;
                }
                if !seen.contains(&id) {
                    seen.push(id.clone());
                }
                if reached.iter().any(|(r, _)| *r == id) {
                    continue;
                }
                let Some(in_service) = in_service_at(&m) else {
                    continue;
                };
                if m["open_connections"].as_u64().unwrap_or(0) >= share {
                    let secs = now_ms.saturating_sub(in_service) as f64 / 1e3;
                    reached.push((id, secs));
                }
            }
            progress(&format!(
                "{label}: {:.0}s/{:.0}s, {} of {} new minions hold their share of {share}",
                started.elapsed().as_secs_f64(),
                a.window.as_secs_f64(),
                reached.len(),
                a.to - 1
            ));
            tokio::time::sleep(POLL).await;
        }
        window.push((live.acked() - acked) as f64 / started.elapsed().as_secs_f64());
        new_minions += (a.to as usize - 1).max(seen.len());
        end_progress();
        eprintln!(
            "{label}: {} of {} new minions held {share}+ connections within {:.0}s: {}; {:.0} msg/s on one minion, {:.0} msg/s after",
            reached.len(),
            a.to - 1,
            a.window.as_secs_f64(),
            if reached.is_empty() {
                "none".to_owned()
            } else {
                reached
                    .iter()
                    .map(|(_, s)| format!("{s:.1}s"))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
            before.last().copied().unwrap_or_default(),
            window.last().copied().unwrap_or_default(),
        );
        times.extend(reached.into_iter().map(|(_, s)| s));
    }
    stop.cancel();
    let summary = driver.await.context("the driver panicked")??;
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    Ok(ModeReport {
        mode,
        scale_outs: a.scale_outs,
        new_minions,
        reached_share: times.len(),
        time_to_share_p50_secs: percentile(&sorted, 0.5),
        time_to_share_max_secs: sorted.last().copied(),
        times_to_share_secs: times,
        before_msgs_per_sec: mean(&before),
        window_msgs_per_sec: mean(&window),
        acked: summary.acked,
        nacked: summary.nacked,
        errors: summary.errors,
        reconnects: summary.reconnects,
    })
}

/// Pins the fleet at one minion and waits until it alone is left and holds
/// every connection; returns its id.
async fn settle_on_one(a: &RebalanceArgs, dev: &Dev, label: &str) -> anyhow::Result<String> {
    dev.cli_retrying(&["scale", "local", "1"]).await?;
    let started = Instant::now();
    loop {
        let minions = dev.minions().await?;
        if let [only] = minions.as_slice()
            && only["state"] == "InService"
            && only["open_connections"].as_u64() == Some(a.connections as u64)
        {
            end_progress();
            return Ok(only["id"].as_str().unwrap_or_default().to_owned());
        }
        if started.elapsed() > SETTLE {
            bail!(
                "the fleet did not settle on one minion holding all {} connections within {SETTLE:?}: {}",
                a.connections,
                minions
                    .iter()
                    .map(|m| format!("{} {} {}", m["id"], m["state"], m["open_connections"]))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
        progress(&format!(
            "{label}: back to one minion holding all {} connections ({:.0}s)",
            a.connections,
            started.elapsed().as_secs_f64()
        ));
        tokio::time::sleep(POLL).await;
    }
}

/// When the minion last went InService, by the controller's clock.
fn in_service_at(m: &Value) -> Option<u64> {
    m["history"]
        .as_array()?
        .iter()
        .rev()
        .find(|t| t["to"] == "InService")?["at_unix_ms"]
        .as_u64()
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// The `q` quantile of sorted values (nearest rank).
fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

fn print_report(r: &RebalanceReport) {
    println!(
        "{} connections, 1 → {} minions, window {:.0}s, max connection age {:.0}s, downstream ACK delay {:.0} ms",
        r.connections, r.to, r.window_secs, r.max_connection_age_secs, r.sink_ack_delay_ms
    );
    println!(
        "{:<10} {:>10} {:>9} {:>9} {:>9} {:>12} {:>12} {:>7} {:>7}",
        "mode", "new", "reached", "p50", "max", "before/s", "window/s", "NACKs", "errors"
    );
    let secs = |s: Option<f64>| s.map_or_else(|| "-".to_owned(), |s| format!("{s:.1}s"));
    for m in &r.modes {
        println!(
            "{:<10} {:>10} {:>9} {:>9} {:>9} {:>12.0} {:>12.0} {:>7} {:>7}",
            format!("{:?}", m.mode).to_lowercase(),
            m.new_minions,
            m.reached_share,
            secs(m.time_to_share_p50_secs),
            secs(m.time_to_share_max_secs),
            m.before_msgs_per_sec,
            m.window_msgs_per_sec,
            m.nacked,
            m.errors
        );
    }
    println!(
        "time to share: from a new minion's InService to a listing showing it with {}+ connections (includes up to 1 s of report age)",
        r.connections / r.to as usize
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(percentile(&[1.0], 0.5), Some(1.0));
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 0.5), Some(2.0));
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 1.0), Some(4.0));
    }
}
