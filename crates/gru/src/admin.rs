//! The admin commands: one gRPC call each, a table for people and `--json`
//! for scripts, and a progress line while `--wait` waits.

use std::path::PathBuf;
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Args;
use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use gru_proto::v1 as pb;
use gru_proto::v1::admin_service_client::AdminServiceClient;
use indicatif::{ProgressBar, ProgressStyle};
use tonic::transport::Channel;

use crate::client;

/// Poll interval while waiting.
const WAIT_POLL: Duration = Duration::from_millis(250);
const DEFAULT_WAIT_TIMEOUT: &str = "5m";

#[derive(Args)]
pub struct Common {
    /// The client config (default: $GRU_CONFIG, else the one `gru dev` writes).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
}

#[derive(Args)]
pub struct JsonArg {
    #[command(flatten)]
    pub common: Common,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct FleetArg {
    #[command(flatten)]
    pub common: Common,
    /// The fleet's name.
    pub fleet: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct MinionLsArgs {
    #[command(flatten)]
    pub common: Common,
    /// Only this fleet's minions.
    #[arg(long)]
    pub fleet: Option<String>,
    /// Include minions that are Gone.
    #[arg(long, short)]
    pub all: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct MinionGetArgs {
    #[command(flatten)]
    pub common: Common,
    /// Minion id (m-…) or instance id.
    pub id: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ScaleArgs {
    #[command(flatten)]
    pub common: Common,
    /// The fleet's name.
    pub fleet: String,
    /// The number of minions to pin the fleet at, or `auto` to release the pin.
    #[arg(value_parser = parse_size)]
    pub size: Size,
    /// Let the pin end by itself after this long (e.g. 30m, 2h).
    #[arg(long = "for", value_name = "DURATION", value_parser = parse_positive_duration, conflicts_with = "until")]
    pub for_: Option<Duration>,
    /// Let the pin end by itself at this time (RFC 3339, e.g. 2026-11-25T18:00:00Z).
    #[arg(long, value_parser = parse_future_time)]
    pub until: Option<std::time::SystemTime>,
    /// Wait until the fleet has exactly that many minions in service and none draining.
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this long.
    #[arg(long, default_value = DEFAULT_WAIT_TIMEOUT, value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct DrainArgs {
    #[command(flatten)]
    pub common: Common,
    /// Minion id (m-…) or instance id.
    pub id: String,
    /// Keep the fleet's size: a new minion replaces this one.
    #[arg(long)]
    pub replace: bool,
    /// Wait until the minion is Gone.
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this long.
    #[arg(long, default_value = DEFAULT_WAIT_TIMEOUT, value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct EventsArgs {
    #[command(flatten)]
    pub common: Common,
    /// Keep printing new events.
    #[arg(long, short)]
    pub follow: bool,
    /// Only this fleet's events.
    #[arg(long)]
    pub fleet: Option<String>,
    /// Events since a duration ago (`2h`, `30m`) or a time
    /// (`2026-12-01T08:00:00Z`), from the controller's event log, which
    /// survives restarts. Without it, the most recent 500.
    #[arg(long, value_name = "DURATION|TIME", value_parser = parse_since)]
    pub since: Option<std::time::SystemTime>,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
}

/// What `gru scale FLEET SIZE` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Size {
    Minions(u32),
    Auto,
}

fn parse_size(s: &str) -> Result<Size, String> {
    if s == "auto" {
        return Ok(Size::Auto);
    }
    s.parse()
        .map(Size::Minions)
        .map_err(|_| format!("a number of minions or `auto`, not {s:?}"))
}

/// `--for`: a pin that ends at once would scale in at once.
fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("the pin must last longer than 0s".to_owned()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

/// `--until`: a time still to come.
fn parse_future_time(s: &str) -> Result<std::time::SystemTime, String> {
    let t = humantime::parse_rfc3339_weak(s).map_err(|e| e.to_string())?;
    if t <= std::time::SystemTime::now() {
        return Err(format!("{s} is not in the future"));
    }
    Ok(t)
}

/// `--since`: a duration back from now, or an RFC 3339 time.
fn parse_since(s: &str) -> Result<std::time::SystemTime, String> {
    if let Ok(d) = humantime::parse_duration(s) {
        return std::time::SystemTime::now()
            .checked_sub(d)
            .ok_or_else(|| format!("{s} reaches before 1970"));
    }
    humantime::parse_rfc3339_weak(s).map_err(|_| {
        format!("expected a duration like 2h or a time like 2026-12-01T08:00:00Z, got {s:?}")
    })
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY)
        .set_header(header.iter().copied());
    t
}

fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn age(ms: u64) -> String {
    humantime::format_duration(Duration::from_secs(ms / 1000)).to_string()
}

fn clock(unix_ms: u64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(unix_ms);
    let s = humantime::format_rfc3339_millis(t).to_string();
    // 2026-11-25T03:10:20.123Z → 03:10:20.123
    s.get(11..23).unwrap_or(&s).to_owned()
}

/// A moment as an operator reads it: UTC, to the second.
fn when(unix_ms: u64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(unix_ms);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn fleet_table(fleets: &[pb::Fleet]) -> Table {
    let mut t = table(&[
        "FLEET",
        "PROVIDER",
        "MIN",
        "MAX",
        "DESIRED",
        "CAPACITY",
        "IN SERVICE",
        "DRAINING",
        "QUEUED",
        "IN FLIGHT",
        "MODE",
        "WHY",
    ]);
    for f in fleets {
        let by = |who: &str| {
            if who.is_empty() {
                String::new()
            } else {
                format!(" by {who}")
            }
        };
        let mode = match (f.paused, f.pinned) {
            (true, _) => {
                let since = f
                    .paused_at_unix_ms
                    .map(|ms| format!(" since {}", when(ms)))
                    .unwrap_or_default();
                format!("paused{since}{}", by(&f.paused_by))
            }
            (false, Some(n)) => {
                let until = f
                    .pinned_until_unix_ms
                    .map(|ms| format!(" until {}", when(ms)))
                    .unwrap_or_default();
                format!("pinned {n}{until}{}", by(&f.pinned_by))
            }
            (false, None) => "auto".to_owned(),
        };
        t.add_row(vec![
            f.name.clone(),
            f.provider.clone(),
            f.min.to_string(),
            f.max.to_string(),
            f.desired.to_string(),
            f.capacity.to_string(),
            f.in_service.to_string(),
            f.draining.to_string(),
            f.queue_depth.to_string(),
            f.in_flight.to_string(),
            mode,
            f.reason.clone(),
        ]);
    }
    t
}

pub async fn fleet_ls(a: JsonArg) -> anyhow::Result<()> {
    let mut admin = client::connect(a.common.config.as_deref()).await?;
    let fleets = call(
        &admin.address,
        admin.client.list_fleets(pb::ListFleetsRequest {}).await,
    )?
    .fleets;
    if a.json {
        return print_json(&fleets);
    }
    println!("{}", fleet_table(&fleets));
    Ok(())
}

fn call<T>(address: &str, r: Result<tonic::Response<T>, tonic::Status>) -> anyhow::Result<T> {
    r.map(tonic::Response::into_inner)
        .map_err(|s| client::explain(address, s))
}

pub async fn minion_ls(a: MinionLsArgs) -> anyhow::Result<()> {
    let mut admin = client::connect(a.common.config.as_deref()).await?;
    let req = pb::ListMinionsRequest {
        fleet: a.fleet.unwrap_or_default(),
        include_gone: a.all,
    };
    let minions = call(&admin.address, admin.client.list_minions(req).await)?.minions;
    if a.json {
        return print_json(&minions);
    }
    let mut t = table(&[
        "ID",
        "FLEET",
        "INSTANCE",
        "STATE",
        "FOR",
        "ENGINE",
        "QUEUED",
        "IN FLIGHT",
        "CONNS",
        "PROCESSED",
        "FAILED",
        "REPORTED",
    ]);
    for m in &minions {
        t.add_row(vec![
            m.id.clone(),
            m.fleet.clone(),
            m.instance_id.clone(),
            m.state.clone(),
            age(m.state_age_ms),
            m.engine_address.clone(),
            m.queue_depth.to_string(),
            m.in_flight.to_string(),
            m.open_connections.to_string(),
            m.processed_total.to_string(),
            m.failed_total.to_string(),
            m.last_report_age_ms
                .map_or("never".to_owned(), |ms| format!("{} ago", age(ms))),
        ]);
    }
    println!("{t}");
    if minions.is_empty() {
        println!("no minions");
    }
    Ok(())
}

fn print_minion(m: &pb::Minion) {
    println!("minion    {}  ({})", m.id, m.state);
    println!("fleet     {}", m.fleet);
    println!("instance  {}", m.instance_id);
    println!(
        "engine    {}",
        if m.engine_address.is_empty() {
            "-"
        } else {
            &m.engine_address
        }
    );
    println!(
        "load      queued {}, in flight {}, connections {}, processed {}, failed {}",
        m.queue_depth, m.in_flight, m.open_connections, m.processed_total, m.failed_total
    );
    if !m.drain_reason.is_empty() {
        println!("leaving   {}", m.drain_reason);
    }
    let mut t = table(&["AT", "FROM", "TO", "WHY"]);
    for h in &m.history {
        t.add_row(vec![
            clock(h.at_unix_ms),
            h.from.clone(),
            h.to.clone(),
            h.reason.clone(),
        ]);
    }
    println!("{t}");
}

pub async fn minion_get(a: MinionGetArgs) -> anyhow::Result<()> {
    let mut admin = client::connect(a.common.config.as_deref()).await?;
    let m = call(
        &admin.address,
        admin
            .client
            .get_minion(pb::GetMinionRequest { id: a.id })
            .await,
    )?;
    if a.json {
        return print_json(&m);
    }
    print_minion(&m);
    Ok(())
}

fn spinner(timeout: Duration) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    pb.enable_steady_tick(Duration::from_millis(120));
    pb.set_message(format!(
        "waiting (up to {})",
        humantime::format_duration(timeout)
    ));
    pb
}

pub async fn scale(a: ScaleArgs) -> anyhow::Result<()> {
    let target = match a.size {
        Size::Auto => pb::scale_request::Target::Auto(true),
        Size::Minions(n) => pb::scale_request::Target::Desired(n),
    };
    let until = a
        .until
        .or_else(|| a.for_.map(|d| std::time::SystemTime::now() + d));
    if until.is_some() && matches!(target, pb::scale_request::Target::Auto(_)) {
        bail!("--for and --until go with a size, not with `auto`");
    }
    let until_unix_ms = until.map(|t| {
        t.duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    });
    let mut admin = client::connect(a.common.config.as_deref()).await?;
    let req = pb::ScaleRequest {
        fleet: a.fleet.clone(),
        target: Some(target),
        until_unix_ms,
    };
    let fleet = call(&admin.address, admin.client.scale(req).await)?;
    if !a.wait {
        if a.json {
            return print_json(&fleet);
        }
        match target {
            pb::scale_request::Target::Desired(n) => match until {
                Some(t) => println!(
                    "fleet {} pinned at {n} until {}",
                    fleet.name,
                    humantime::format_rfc3339_seconds(t)
                ),
                None => println!(
                    "fleet {} pinned at {n} (release with `gru scale {} auto`)",
                    fleet.name, fleet.name
                ),
            },
            pb::scale_request::Target::Auto(_) => {
                println!("fleet {} sized by its policy again", fleet.name)
            }
        }
        return Ok(());
    }
    let want = match target {
        pb::scale_request::Target::Desired(n) => Some(n),
        pb::scale_request::Target::Auto(_) => None,
    };
    let client = admin.client.clone();
    let address = admin.address.clone();
    let name = a.fleet.clone();
    let (fleet, took) = wait_with_progress(a.timeout, move || {
        let (client, address, name) = (client.clone(), address.clone(), name.clone());
        async move {
            let f = get_fleet(client, &address, &name).await?;
            let goal = want.unwrap_or(f.desired);
            let status = format!(
                "fleet {}: {}/{goal} in service, {} starting, {} draining",
                f.name,
                f.in_service,
                f.capacity.saturating_sub(f.in_service),
                f.draining
            );
            let done = f.in_service == goal && f.capacity == goal && f.draining == 0;
            Ok(Progress {
                value: f,
                status,
                done,
            })
        }
    })
    .await?;
    if a.json {
        return print_json(&fleet);
    }
    println!(
        "fleet {}: {} in service after {:.1}s",
        fleet.name,
        fleet.in_service,
        took.as_secs_f64()
    );
    Ok(())
}

async fn get_fleet(
    mut client: AdminServiceClient<Channel>,
    address: &str,
    name: &str,
) -> anyhow::Result<pb::Fleet> {
    let fleets = call(address, client.list_fleets(pb::ListFleetsRequest {}).await)?.fleets;
    fleets
        .into_iter()
        .find(|f| f.name == name)
        .with_context(|| format!("no fleet {name:?}"))
}

/// What one poll of a wait saw.
struct Progress<T> {
    value: T,
    /// Shown on the progress line, and in the error when the wait gives up.
    status: String,
    done: bool,
}

/// Polls until `done`, showing each status on a spinner line; gives up after
/// `timeout`. Returns the last value and how long it took.
async fn wait_with_progress<T, F, Fut>(
    timeout: Duration,
    mut poll: F,
) -> anyhow::Result<(T, Duration)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Progress<T>>>,
{
    let started = Instant::now();
    let bar = spinner(timeout);
    loop {
        let p = poll().await?;
        bar.set_message(p.status.clone());
        if p.done {
            bar.finish_and_clear();
            return Ok((p.value, started.elapsed()));
        }
        if started.elapsed() > timeout {
            bar.abandon();
            bail!(
                "gave up after {}: {}",
                humantime::format_duration(timeout),
                p.status
            );
        }
        tokio::time::sleep(WAIT_POLL).await;
    }
}

pub async fn drain(a: DrainArgs) -> anyhow::Result<()> {
    let mut admin = client::connect(a.common.config.as_deref()).await?;
    let req = pb::DrainRequest {
        id: a.id.clone(),
        replace: a.replace,
    };
    let m = call(&admin.address, admin.client.drain(req).await)?;
    if !a.wait {
        if a.json {
            return print_json(&m);
        }
        println!(
            "minion {} is {}: leaving the load balancer, then draining",
            m.id, m.state
        );
        return Ok(());
    }
    let client = admin.client.clone();
    let address = admin.address.clone();
    let id = m.id.clone();
    let (m, took) = wait_with_progress(a.timeout, move || {
        let (mut client, address, id) = (client.clone(), address.clone(), id.clone());
        async move {
            let m = call(
                &address,
                client.get_minion(pb::GetMinionRequest { id }).await,
            )?;
            let status = format!(
                "minion {}: {} (queued {}, in flight {}, connections {})",
                m.id, m.state, m.queue_depth, m.in_flight, m.open_connections
            );
            let done = m.state == "Gone";
            Ok(Progress {
                value: m,
                status,
                done,
            })
        }
    })
    .await?;
    if a.json {
        return print_json(&m);
    }
    println!(
        "minion {} drained and gone after {:.1}s",
        m.id,
        took.as_secs_f64()
    );
    Ok(())
}

pub async fn pause(a: FleetArg, paused: bool) -> anyhow::Result<()> {
    let mut admin = client::connect(a.common.config.as_deref()).await?;
    let fleet = if paused {
        call(
            &admin.address,
            admin
                .client
                .pause(pb::PauseRequest { fleet: a.fleet })
                .await,
        )?
    } else {
        call(
            &admin.address,
            admin
                .client
                .resume(pb::ResumeRequest { fleet: a.fleet })
                .await,
        )?
    };
    if a.json {
        return print_json(&fleet);
    }
    if paused {
        println!(
            "fleet {} paused: decisions are shown (gru fleet ls), not applied",
            fleet.name
        );
    } else {
        println!("fleet {} resumed", fleet.name);
    }
    Ok(())
}

pub async fn explain(a: FleetArg) -> anyhow::Result<()> {
    let mut admin = client::connect(a.common.config.as_deref()).await?;
    let d = call(
        &admin.address,
        admin
            .client
            .explain(pb::ExplainRequest { fleet: a.fleet })
            .await,
    )?;
    if a.json {
        return print_json(&d);
    }
    println!("fleet {}, decided at {}", d.fleet, clock(d.at_unix_ms));
    println!("{}", d.text.trim_end());
    Ok(())
}

pub async fn events(a: EventsArgs) -> anyhow::Result<()> {
    let mut admin = client::connect(a.common.config.as_deref()).await?;
    let since_unix_ms = a.since.map(|t| {
        t.duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    });
    let req = pb::WatchEventsRequest {
        fleet: a.fleet.unwrap_or_default(),
        follow: a.follow,
        since_unix_ms,
    };
    let mut stream = call(&admin.address, admin.client.watch_events(req).await)?;
    while let Some(e) = stream
        .message()
        .await
        .map_err(|s| client::explain(&admin.address, s))?
    {
        if a.json {
            println!("{}", serde_json::to_string(&e)?);
        } else {
            let who = if e.minion_id.is_empty() {
                String::new()
            } else {
                format!(" {}", e.minion_id)
            };
            let at = if since_unix_ms.is_some() {
                when(e.at_unix_ms)
            } else {
                clock(e.at_unix_ms)
            };
            println!("{} {:<10} {}{}  {}", at, e.kind, e.fleet, who, e.message);
        }
    }
    Ok(())
}
