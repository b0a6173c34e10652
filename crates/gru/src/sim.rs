//! `gru sim run` replays a traffic trace against a fleet's policy and three
//! baselines on a virtual clock (gru_core::sim), and writes a timeline CSV
//! and an SVG chart; `gru sim generate` makes the seeded sample traces.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use gru_controller::ControllerConfig;
use gru_core::sim::{
    self, GruPolicy, Model, Oracle, Scaler, SimResult, StaticPeak, TargetTracking, Trace,
    TraceKind, TracePoint,
};
use jiff::Timestamp;
use serde::Serialize;

#[derive(Subcommand)]
pub enum SimCommand {
    /// Replay a trace against a fleet's policy and the baselines.
    Run(RunArgs),
    /// Write a seeded synthetic trace (CSV: timestamp,arrivals_per_s).
    Generate(GenerateArgs),
}

#[derive(Args)]
pub struct RunArgs {
    /// CSV with a header and rows `timestamp,arrivals_per_s` (RFC 3339 times).
    #[arg(long)]
    trace: PathBuf,
    /// The controller config whose fleet policy to replay. Keys the
    /// simulator does not read ([tls], join_token_file, a fleet's provider
    /// and its table) may be left out.
    #[arg(long, short)]
    config: PathBuf,
    /// The fleet (default: the config's first).
    #[arg(long)]
    fleet: Option<String>,
    /// Messages per second one minion serves.
    #[arg(long, default_value_t = 100.0)]
    service_rate: f64,
    /// Messages one minion works on at once (its downstream connections).
    #[arg(long, default_value_t = 4)]
    slots: u32,
    /// Launch to in service.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    boot_time: Duration,
    /// Chosen for removal to terminated.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    drain_time: Duration,
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    report_interval: Duration,
    /// How often each scaler decides.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    eval_interval: Duration,
    /// Queued work waiting longer than this counts toward SLO-breach minutes.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    slo_wait: Duration,
    /// The target-tracking baseline's utilization target.
    #[arg(long, default_value_t = 0.7)]
    target_utilization: f64,
    /// Senders hold this many long-lived connections across the fleet, and
    /// a minion serves only through those it holds (full rate from --slots
    /// of them): a new minion gets work as senders reconnect onto it, by
    /// --max-connection-age or, for gru with `[fleet.rebalance]` on, by
    /// rebalancing. Default: no connections (a minion serves once booted).
    #[arg(long)]
    connections: Option<u32>,
    /// With --connections: engines close a connection after this age
    /// (jittered up to twice it); 0s = never.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    max_connection_age: Duration,
    /// Where the timeline CSV and the chart go.
    #[arg(long, default_value = "sim-out")]
    out: PathBuf,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Kind {
    /// A week: weekday diurnal curve, weekend dip, a few bursts.
    Week,
    /// Six hours of steady load with a sharp 6× spike.
    Spike,
    /// Twelve hours of a trickle with a batch dumped every 4–12 minutes,
    /// and a half-hour upstream outage flushed afterwards.
    Batch,
    /// Two weeks of working hours: a climb to the peak within three minutes
    /// at 07:00 every weekday, lunch dip, 17:00 fall, Saturday mornings, a
    /// holiday on the second Thursday.
    Shifts,
}

#[derive(Args)]
pub struct GenerateArgs {
    #[arg(long, value_enum, default_value_t = Kind::Week)]
    kind: Kind,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The weekday midday (or spike) rate, messages per second.
    #[arg(long, default_value_t = 1000.0)]
    peak: f64,
    /// The first row's time (a Monday 00:00 UTC by default).
    #[arg(long, default_value = "2026-11-23T00:00:00Z")]
    start: Timestamp,
    /// Write here instead of standard output.
    #[arg(long, short)]
    output: Option<PathBuf>,
}

pub fn run(command: SimCommand) -> anyhow::Result<()> {
    match command {
        SimCommand::Run(a) => replay(a),
        SimCommand::Generate(a) => generate(a),
    }
}

fn generate(a: GenerateArgs) -> anyhow::Result<()> {
    let kind = match a.kind {
        Kind::Week => TraceKind::Week,
        Kind::Spike => TraceKind::Spike,
        Kind::Batch => TraceKind::Batch,
        Kind::Shifts => TraceKind::Shifts,
    };
    let trace = sim::generate(kind, a.seed, a.peak, a.start);
    let mut csv = String::from("timestamp,arrivals_per_s\n");
    for p in trace.points() {
        csv.push_str(&format!("{},{:.2}\n", p.at, p.arrivals_per_s));
    }
    match a.output {
        Some(path) => {
            std::fs::write(&path, csv).with_context(|| format!("cannot write {}", path.display()))
        }
        None => {
            print!("{csv}");
            Ok(())
        }
    }
}

/// Reads a controller config for its fleets' policies. The keys a running
/// controller needs and the simulator does not ([tls], join_token_file, a
/// fleet's provider) are filled in with placeholders where absent, so a
/// policy can be simulated from a file that holds only the policy; what is
/// there is validated as the controller would.
pub fn load_policies(path: &Path) -> anyhow::Result<ControllerConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    let mut table: toml::Table = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.to_string().trim_end()))?;
    let placeholder = |s: &str| toml::Value::String(s.to_owned());
    table
        .entry("join_token_file")
        .or_insert_with(|| placeholder("(not read by gru sim)"));
    table.entry("tls").or_insert_with(|| {
        toml::Value::Table(
            ["cert", "key", "client_ca"]
                .into_iter()
                .map(|k| (k.to_owned(), placeholder("(not read by gru sim)")))
                .collect(),
        )
    });
    if let Some(toml::Value::Array(fleets)) = table.get_mut("fleet") {
        for fleet in fleets.iter_mut() {
            let toml::Value::Table(f) = fleet else {
                continue;
            };
            if !f.contains_key("provider") && !f.contains_key("local") && !f.contains_key("aws") {
                f.insert("provider".to_owned(), placeholder("local"));
                let local: toml::Table = [
                    ("listen", placeholder("127.0.0.1:0")),
                    ("minion_config", placeholder("(not read by gru sim)")),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect();
                f.insert("local".to_owned(), toml::Value::Table(local));
            }
        }
    }
    let filled = toml::to_string(&table).context("cannot re-serialize the config")?;
    ControllerConfig::parse(path, &filled)
        .map_err(|e| anyhow::anyhow!("invalid configuration: {}", gru_core::error_chain(&e)))
}

pub fn read_trace(path: &Path) -> anyhow::Result<Trace> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read trace {}", path.display()))?;
    let mut points = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || (i == 0 && line.starts_with("timestamp")) {
            continue;
        }
        let bad =
            |what: &str| anyhow::anyhow!("{}:{}: {what}, got {line:?}", path.display(), i + 1);
        let (at, rate) = line
            .split_once(',')
            .ok_or_else(|| bad("expected `timestamp,arrivals_per_s`"))?;
        let at: Timestamp = at
            .trim()
            .parse()
            .map_err(|_| bad("timestamp must be RFC 3339, like 2026-11-23T00:00:00Z"))?;
        let arrivals_per_s: f64 = rate
            .trim()
            .parse()
            .map_err(|_| bad("arrivals_per_s must be a number"))?;
        points.push(TracePoint { at, arrivals_per_s });
    }
    Trace::new(points).with_context(|| format!("invalid trace {}", path.display()))
}

#[derive(Serialize)]
struct Row {
    scaler: String,
    instance_hours: f64,
    slo_breach_minutes: f64,
    scale_actions: u32,
    max_queue: f64,
    /// With --connections: from a new minion's InService to it holding its
    /// share of the connections.
    time_to_share_p50_secs: Option<f64>,
    time_to_share_max_secs: Option<f64>,
    /// Minions that left service before they held their share.
    never_shared: u32,
    /// Held at the fleet's max: the most it asked for, and how often.
    wanted_above_max: Option<u32>,
    evaluations_above_max: u32,
    /// What the scaler said about its run (gru: how often the forecast and
    /// the break-even hold acted).
    notes: Vec<String>,
}

#[derive(Serialize)]
struct Summary {
    results: Vec<Row>,
    gru_over_oracle_instance_hours: f64,
    gru_over_static_instance_hours: f64,
    timeline_csv: PathBuf,
    chart_svg: PathBuf,
}

fn replay(a: RunArgs) -> anyhow::Result<()> {
    let trace = read_trace(&a.trace)?;
    let config = load_policies(&a.config)?;
    let fleet = match &a.fleet {
        Some(name) => config
            .fleets
            .iter()
            .find(|f| &f.name == name)
            .with_context(|| format!("no fleet {name:?} in {}", a.config.display()))?,
        None => config.fleets.first().context("the config has no fleet")?,
    };
    if a.service_rate <= 0.0 || !a.service_rate.is_finite() {
        bail!("--service-rate must be above 0");
    }
    let model = Model {
        service_rate: a.service_rate,
        slots_per_minion: a.slots.max(1),
        boot_time: a.boot_time,
        drain_time: a.drain_time,
        report_interval: a.report_interval,
        eval_interval: a.eval_interval,
        slo_wait: a.slo_wait,
        connections: a.connections.filter(|c| *c > 0),
        max_connection_age: a.max_connection_age,
        bounds: Some(fleet.policy.bounds()),
    };
    let peak = StaticPeak::for_trace(&trace, &model);
    let start = peak.minions;
    let mut scalers: Vec<Box<dyn Scaler>> = vec![
        Box::new(GruPolicy::new(fleet.policy.clone()).with_rebalance(fleet.rebalance)),
        Box::new(peak),
        Box::new(TargetTracking::new(a.target_utilization)),
        Box::new(Oracle),
    ];
    // Every scaler starts from the capacity the trace's first rate needs.
    let initial = ((trace.rate_at(trace.start()) / model.service_rate).ceil() as u32).max(1);
    let results: Vec<SimResult> = scalers
        .iter_mut()
        .map(|s| {
            let first = if s.name().starts_with("static") {
                start
            } else {
                initial
            };
            sim::run(&trace, &model, s.as_mut(), first)
        })
        .collect();
    let (gru, stat, oracle) = (&results[0], &results[1], &results[3]);
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let csv = a.out.join("timeline.csv");
    write_timeline(&csv, &results)?;
    let svg = a.out.join("chart.svg");
    crate::chart::draw(&svg, &results).with_context(|| format!("cannot draw {}", svg.display()))?;
    let summary = Summary {
        results: results
            .iter()
            .map(|r| Row {
                scaler: r.scaler.clone(),
                instance_hours: r.instance_hours,
                slo_breach_minutes: r.slo_breach_minutes,
                scale_actions: r.scale_actions,
                max_queue: r.max_queue,
                time_to_share_p50_secs: r.time_to_share().map(|(p50, _)| p50.as_secs_f64()),
                time_to_share_max_secs: r.time_to_share().map(|(_, max)| max.as_secs_f64()),
                never_shared: r.never_shared,
                wanted_above_max: r.above_max.map(|m| m.most_wanted),
                evaluations_above_max: r.above_max.map_or(0, |m| m.evaluations),
                notes: r.notes.clone(),
            })
            .collect(),
        gru_over_oracle_instance_hours: gru.instance_hours / oracle.instance_hours,
        gru_over_static_instance_hours: gru.instance_hours / stat.instance_hours,
        timeline_csv: csv,
        chart_svg: svg,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    println!(
        "trace {} → {} ({} rows, peak {:.0} msg/s); fleet {} on {} msg/s per minion, boot {}, drain {}\n",
        trace.start(),
        trace.end(),
        trace.points().len(),
        trace.peak(),
        fleet.name,
        model.service_rate,
        humantime::format_duration(model.boot_time),
        humantime::format_duration(model.drain_time)
    );
    for r in &results {
        match (model.connections, r.time_to_share()) {
            (None, _) => println!("{r}"),
            (Some(_), Some((p50, max))) => println!(
                "{r}  time to share p50 {} max {}{}",
                humantime::format_duration(p50),
                humantime::format_duration(max),
                if r.never_shared > 0 {
                    format!(" ({} never)", r.never_shared)
                } else {
                    String::new()
                }
            ),
            (Some(_), None) => println!("{r}  time to share: none measured"),
        }
    }
    for r in &results {
        for note in &r.notes {
            println!("{}: {note}", r.scaler);
        }
    }
    let bounds = fleet.policy.bounds();
    for r in &results {
        if let Some(m) = r.above_max {
            println!(
                "{} wanted up to {} minions, above the fleet's max of {}, at {} evaluation{}: held at {} as gru is",
                r.scaler,
                m.most_wanted,
                bounds.max,
                m.evaluations,
                if m.evaluations == 1 { "" } else { "s" },
                bounds.max
            );
        }
    }
    if let Some(c) = model.connections {
        println!(
            "\n{c} long-lived connections; a new minion serves through those that reach it (max connection age {}; gru {} rebalancing)",
            humantime::format_duration(model.max_connection_age),
            if fleet.rebalance.is_some() {
                "with"
            } else {
                "without"
            }
        );
    }
    println!(
        "\ngru / oracle instance-hours {:.3}   gru / static {:.3}\ntimeline {}   chart {}",
        summary.gru_over_oracle_instance_hours,
        summary.gru_over_static_instance_hours,
        summary.timeline_csv.display(),
        summary.chart_svg.display()
    );
    Ok(())
}

fn write_timeline(path: &Path, results: &[SimResult]) -> anyhow::Result<()> {
    let mut csv = String::from("timestamp,arrivals_per_s");
    for r in results {
        let slug: String = r.scaler.split(' ').next().unwrap_or("scaler").to_owned();
        csv.push_str(&format!(",{slug}_desired,{slug}_in_service,{slug}_queued"));
    }
    csv.push('\n');
    let rows = results.iter().map(|r| r.timeline.len()).min().unwrap_or(0);
    for i in 0..rows {
        let first = &results[0].timeline[i];
        csv.push_str(&format!("{},{:.2}", first.at, first.arrivals_per_s));
        for r in results {
            let row = &r.timeline[i];
            csv.push_str(&format!(
                ",{},{},{:.0}",
                row.desired, row.in_service, row.queued
            ));
        }
        csv.push('\n');
    }
    std::fs::write(path, csv).with_context(|| format!("cannot write {}", path.display()))
}
