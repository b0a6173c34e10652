//! The admin commands: one gRPC call each within a deadline (`--timeout`),
//! a table that fits the terminal for people (`-o wide` for every column)
//! and `--json` for scripts, a progress line while `--wait` waits, and an
//! `events -f` that outlives a controller restart. With several controllers
//! each call goes to the leader (see `client`), and `gru controller status`
//! asks every one of them which leads.

use std::path::PathBuf;
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use comfy_table::{ContentArrangement, Table, presets::UTF8_BORDERS_ONLY};
use gru_proto::v1 as pb;
use indicatif::{ProgressBar, ProgressStyle};

use crate::client::{self, Admin, Deadline};

/// Poll interval while waiting.
const WAIT_POLL: Duration = Duration::from_millis(250);
/// How long `--wait` waits unless `--timeout` says otherwise.
const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// `events -f` reconnects this long after the controller closed the stream,
/// then waits twice as long after each failed attempt, up to
/// [`RECONNECT_MAX`]. One operator's CLI needs no jitter.
const RECONNECT_FIRST: Duration = Duration::from_secs(1);
const RECONNECT_MAX: Duration = Duration::from_secs(30);
/// A reconnect asks for the events from this long before the newest one
/// printed, and skips those already printed: events of the same moment can
/// reach a watcher out of order, and the log answers "at or after".
const RESUME_OVERLAP_MS: u64 = 5_000;

const TIMEOUT_HELP: &str =
    "Give up after this long: connecting, the TLS handshake and the call together [default: 10s]";
const WAIT_TIMEOUT_HELP: &str = "Give up after this long [default: 10s; with --wait: 5m, the whole wait]. \
Connecting and each call are bounded by 10s in any case";
const EVENTS_TIMEOUT_HELP: &str = "Give up after this long [default: 10s]: connecting, the TLS handshake and \
opening the stream, and without -f reading the events too; with -f an open stream runs as long as it lasts";

#[derive(Args)]
pub struct Common {
    /// The client config (default: $GRU_CONFIG, else the one `gru dev` writes).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    #[arg(long, value_name = "DURATION", value_parser = parse_timeout, help = TIMEOUT_HELP)]
    pub timeout: Option<Duration>,
    #[arg(
        long,
        global = true,
        value_name = "URL",
        value_delimiter = ',',
        help = CONTROLLER_HELP
    )]
    pub controller: Vec<String>,
}

const CONTROLLER_HELP: &str = "The controller's address (https://host:port) instead of the client config's \
`controller`. Several controllers (one leads, the others are standbys): repeat the flag or separate the \
addresses with commas. The CLI tries them in turn and follows a standby to the leader it names, if that \
is one of them";

impl Common {
    /// The deadline of a command that makes one call.
    fn deadline(&self) -> Deadline {
        Deadline::after(self.timeout.unwrap_or(client::DEFAULT_TIMEOUT))
    }

    async fn connect(&self, deadline: Deadline) -> anyhow::Result<Admin> {
        client::connect(self.config.as_deref(), &self.controller, deadline).await
    }
}

/// How a listing is printed besides the default table that fits the terminal.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Every column, each row on one line however long (as `kubectl -o wide`).
    Wide,
    /// The same as --json.
    Json,
}

const TABLE_HELP: &str = "Tables fit $COLUMNS if it is set, else the terminal's width (long cells wrap), \
and leave out the less used columns; -o wide shows every column on one line per row. \
When stdout is not a terminal and COLUMNS is not set, rows are not wrapped. \
Scripts should use --json, whose fields do not change with the width.";

#[derive(Args)]
#[command(after_help = TABLE_HELP)]
pub struct FleetLsArgs {
    #[command(flatten)]
    pub common: Common,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// `wide`: also PROVIDER, MIN, MAX, DESIRED, CAPACITY and IN FLIGHT; `json`: as --json.
    #[arg(long, short, value_enum, value_name = "FORMAT")]
    pub output: Option<Output>,
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
#[command(after_help = TABLE_HELP)]
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
    /// `wide`: also INSTANCE, ENGINE, PROCESSED, FAILED and REPORTED; `json`: as --json.
    #[arg(long, short, value_enum, value_name = "FORMAT")]
    pub output: Option<Output>,
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

const SCALE_AFTER_HELP: &str = "\
Releasing a pin (`gru scale FLEET auto`, or the end of --for/--until) hands the size back to \
the policy, but not as an instant scale-in: the fleet keeps the size it has for one \
scale_in_stabilization window from the release (as after a controller start), then shrinks \
as the policy says, by at most max_step_in minions per decision with scale_in_cooldown after \
each step. Each minion leaves the load balancer and drains before it is terminated. If the \
policy wants more, it scales out at once. `gru explain FLEET` shows each decision and what \
held it.";

#[derive(Args)]
#[command(after_long_help = SCALE_AFTER_HELP, mut_arg("timeout", |a| a.help(WAIT_TIMEOUT_HELP)))]
pub struct ScaleArgs {
    #[command(flatten)]
    pub common: Common,
    /// The fleet's name.
    pub fleet: String,
    /// The number of minions to pin the fleet at, or `auto` to release the pin (see --help for what follows).
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
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
#[command(mut_arg("timeout", |a| a.help(WAIT_TIMEOUT_HELP)))]
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
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
#[command(mut_arg("timeout", |a| a.help(EVENTS_TIMEOUT_HELP)))]
pub struct EventsArgs {
    #[command(flatten)]
    pub common: Common,
    /// Keep printing new events. When the controller closes the stream (it
    /// stopped or restarted), say so on stderr, reconnect with backoff (1s,
    /// 2s, 4s, … 30s) and carry on where it stopped, printing no event twice.
    #[arg(long, short)]
    pub follow: bool,
    /// With -f: exit (non-zero) when the controller closes the stream instead of reconnecting.
    #[arg(long, requires = "follow")]
    pub no_retry: bool,
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

/// `--timeout`: a deadline of 0s would fail every call.
fn parse_timeout(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("the timeout must be longer than 0s".to_owned()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
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

/// How wide a table may be: `$COLUMNS` when it is a number, else the
/// terminal's width; `None` (no limit, one line per row) when neither is
/// known, e.g. stdout is a pipe and COLUMNS is not set.
fn table_width(columns: Option<&str>, terminal: Option<u16>) -> Option<u16> {
    columns
        .and_then(|c| c.trim().parse::<u16>().ok())
        .filter(|&w| w > 0)
        .or(terminal)
}

/// A table with `header`; unless `wide`, it fits [`table_width`] by
/// wrapping its longest cells.
fn table(header: &[&str], wide: bool) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY)
        .set_header(header.iter().copied());
    if !wide {
        let columns = std::env::var("COLUMNS").ok();
        // `Table::width` is the terminal's width when stdout is one.
        if let Some(w) = table_width(columns.as_deref(), t.width()) {
            t.set_width(w)
                .set_content_arrangement(ContentArrangement::Dynamic);
        }
    }
    t
}

fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// A duration to its two largest units (`1h 2m`, not `1h 2m 3s`): enough
/// to read, and short enough for a narrow column.
fn age(ms: u64) -> String {
    let full = humantime::format_duration(Duration::from_secs(ms / 1000)).to_string();
    full.split(' ').take(2).collect::<Vec<_>>().join(" ")
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

fn fleet_table(fleets: &[pb::Fleet], wide: bool) -> Table {
    let mut t = if wide {
        table(
            &[
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
            ],
            true,
        )
    } else {
        table(
            &["FLEET", "IN SERVICE", "DRAINING", "QUEUED", "MODE", "WHY"],
            false,
        )
    };
    for f in fleets {
        let by = |who: &str| {
            if who.is_empty() {
                String::new()
            } else {
                format!(" by {who}")
            }
        };
        // The narrow table leaves out who and since when (`-o wide`,
        // `--json` and the events have them), and breaks the pin's end at a
        // space so a narrow column wraps it there.
        let mode = match (f.paused, f.pinned) {
            (true, _) if !wide => "paused".to_owned(),
            (true, _) => {
                let since = f
                    .paused_at_unix_ms
                    .map(|ms| format!(" since {}", when(ms)))
                    .unwrap_or_default();
                format!("paused{since}{}", by(&f.paused_by))
            }
            (false, Some(n)) if !wide => {
                let until = f
                    .pinned_until_unix_ms
                    .map(|ms| format!(" until {}", when(ms).replacen('T', " ", 1)))
                    .unwrap_or_default();
                format!("pinned {n}{until}")
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
        if wide {
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
        } else {
            t.add_row(vec![
                f.name.clone(),
                // Of the size it should have, as kubectl's READY 2/3.
                format!("{}/{}", f.in_service, f.desired),
                f.draining.to_string(),
                f.queue_depth.to_string(),
                mode,
                f.reason.clone(),
            ]);
        }
    }
    t
}

/// `--json` or `-o json`.
fn wants_json(json: bool, output: Option<Output>) -> bool {
    json || output == Some(Output::Json)
}

pub async fn fleet_ls(a: FleetLsArgs) -> anyhow::Result<()> {
    let mut admin = a.common.connect(a.common.deadline()).await?;
    let fleets = admin
        .call("ListFleets", async |c| {
            c.list_fleets(pb::ListFleetsRequest {}).await
        })
        .await?
        .fleets;
    if wants_json(a.json, a.output) {
        return print_json(&fleets);
    }
    println!("{}", fleet_table(&fleets, a.output == Some(Output::Wide)));
    Ok(())
}

pub async fn minion_ls(a: MinionLsArgs) -> anyhow::Result<()> {
    let mut admin = a.common.connect(a.common.deadline()).await?;
    let req = pb::ListMinionsRequest {
        fleet: a.fleet.unwrap_or_default(),
        include_gone: a.all,
    };
    let minions = admin
        .call("ListMinions", async |c| c.list_minions(req.clone()).await)
        .await?
        .minions;
    if wants_json(a.json, a.output) {
        return print_json(&minions);
    }
    let wide = a.output == Some(Output::Wide);
    let mut t = if wide {
        table(
            &[
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
            ],
            true,
        )
    } else {
        table(
            &[
                "ID",
                "FLEET",
                "STATE",
                "FOR",
                "QUEUED",
                "IN FLIGHT",
                "CONNS",
            ],
            false,
        )
    };
    for m in &minions {
        if wide {
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
        } else {
            t.add_row(vec![
                m.id.clone(),
                m.fleet.clone(),
                m.state.clone(),
                age(m.state_age_ms),
                m.queue_depth.to_string(),
                m.in_flight.to_string(),
                m.open_connections.to_string(),
            ]);
        }
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
    let mut t = table(&["AT", "FROM", "TO", "WHY"], false);
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
    let mut admin = a.common.connect(a.common.deadline()).await?;
    let req = pb::GetMinionRequest { id: a.id };
    let m = admin
        .call("GetMinion", async |c| c.get_minion(req.clone()).await)
        .await?;
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

/// The deadlines of a command that may `--wait`: the whole command's, and
/// one step's (connecting, or one call), which with --wait is also bounded by
/// the default timeout, so a silent controller is noticed in seconds, not at
/// the end of the wait.
#[derive(Clone, Copy)]
struct WaitDeadlines {
    whole: Deadline,
    wait: bool,
}

impl WaitDeadlines {
    fn new(common: &Common, wait: bool) -> (WaitDeadlines, Duration) {
        let budget = common.timeout.unwrap_or(if wait {
            DEFAULT_WAIT_TIMEOUT
        } else {
            client::DEFAULT_TIMEOUT
        });
        (
            WaitDeadlines {
                whole: Deadline::after(budget),
                wait,
            },
            budget,
        )
    }

    fn step(&self) -> Deadline {
        if self.wait {
            Deadline::after(client::DEFAULT_TIMEOUT).min(self.whole)
        } else {
            self.whole
        }
    }
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
    let (deadlines, timeout) = WaitDeadlines::new(&a.common, a.wait);
    let mut admin = a.common.connect(deadlines.step()).await?;
    let req = pb::ScaleRequest {
        fleet: a.fleet.clone(),
        target: Some(target),
        until_unix_ms,
    };
    let fleet = admin
        .call("Scale", async |c| c.scale(req.clone()).await)
        .await?;
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
    let name = a.fleet.clone();
    let (fleet, took) = wait_with_progress(timeout, move || {
        let mut admin = admin.clone();
        admin.to.deadline = deadlines.step();
        let name = name.clone();
        async move {
            let f = get_fleet(&mut admin, &name).await?;
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

async fn get_fleet(admin: &mut Admin, name: &str) -> anyhow::Result<pb::Fleet> {
    let fleets = admin
        .call("ListFleets", async |c| {
            c.list_fleets(pb::ListFleetsRequest {}).await
        })
        .await?
        .fleets;
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
        let p = match poll().await {
            Ok(p) => p,
            Err(e) => {
                bar.abandon();
                return Err(e);
            }
        };
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
    let (deadlines, timeout) = WaitDeadlines::new(&a.common, a.wait);
    let mut admin = a.common.connect(deadlines.step()).await?;
    let req = pb::DrainRequest {
        id: a.id.clone(),
        replace: a.replace,
    };
    let m = admin
        .call("Drain", async |c| c.drain(req.clone()).await)
        .await?;
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
    let id = m.id.clone();
    let (m, took) = wait_with_progress(timeout, move || {
        let mut admin = admin.clone();
        admin.to.deadline = deadlines.step();
        let req = pb::GetMinionRequest { id: id.clone() };
        async move {
            let m = admin
                .call("GetMinion", async |c| c.get_minion(req.clone()).await)
                .await?;
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
    let mut admin = a.common.connect(a.common.deadline()).await?;
    let fleet = if paused {
        let req = pb::PauseRequest { fleet: a.fleet };
        admin
            .call("Pause", async |c| c.pause(req.clone()).await)
            .await?
    } else {
        let req = pb::ResumeRequest { fleet: a.fleet };
        admin
            .call("Resume", async |c| c.resume(req.clone()).await)
            .await?
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
    let mut admin = a.common.connect(a.common.deadline()).await?;
    let req = pb::ExplainRequest { fleet: a.fleet };
    let d = admin
        .call("Explain", async |c| c.explain(req.clone()).await)
        .await?;
    if a.json {
        return print_json(&d);
    }
    println!("fleet {}, decided at {}", d.fleet, clock(d.at_unix_ms));
    println!("{}", d.text.trim_end());
    Ok(())
}

#[derive(Args)]
pub struct WhoamiArgs {
    #[command(flatten)]
    pub common: Common,
    /// Print JSON instead of lines.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
#[command(after_help = "\
An instance on an AWS fleet with [fleet.identity] joins with its signed identity document once; \
after that its minion proves itself with the certificate the controller issued it, and a \
document presented again (copied, or replayed) is refused. A minion that lost its certificate \
(its disk replaced, or down longer than the certificate's lifetime) cannot join again until \
an admin forgets its first join. Replacing the instance (`gru drain ID --replace`) is \
usually the better fix.")]
pub struct MinionForgetArgs {
    #[command(flatten)]
    pub common: Common,
    /// Minion id (m-…) or instance id.
    pub id: String,
}

pub async fn minion_forget(a: MinionForgetArgs) -> anyhow::Result<()> {
    let mut admin = a.common.connect(a.common.deadline()).await?;
    let req = pb::ForgetMinionRequest { id: a.id.clone() };
    let r = admin
        .call("ForgetMinion", async |c| c.forget_minion(req.clone()).await)
        .await?;
    if r.forgotten {
        println!(
            "{}: forgotten; it may join with its identity document once more",
            r.instance_id
        );
    } else {
        println!(
            "{}: had not joined with an identity document; nothing to forget",
            r.instance_id
        );
    }
    Ok(())
}

pub async fn whoami(a: WhoamiArgs) -> anyhow::Result<()> {
    let mut admin = a.common.connect(a.common.deadline()).await?;
    let me = admin
        .call("WhoAmI", async |c| c.who_am_i(pb::WhoAmIRequest {}).await)
        .await?;
    if a.json {
        return print_json(&me);
    }
    let role = if me.role.is_empty() {
        "no role".to_owned()
    } else {
        format!("role {}", me.role)
    };
    println!("{}: {role} ({})", me.identity, me.because);
    if me.allowed.is_empty() {
        println!("may call: nothing but WhoAmI");
    } else {
        println!("may call: {}", me.allowed.join(", "));
    }
    Ok(())
}

const STATUS_HELP: &str = "\
Asks every configured controller (the client config's `controller`, or --controller; a name that \
resolves to several addresses is asked at each), not only the leader, and prints one row each: \
leader, standby, or unreachable and why, with the lease as that controller sees it. Exits 0 when \
exactly one controller says it leads (one controller reached at several addresses counts once), \
1 when none or several do.";

#[derive(Args)]
#[command(after_help = STATUS_HELP)]
pub struct ControllerStatusArgs {
    #[command(flatten)]
    pub common: Common,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One controller's row in `gru controller status`.
#[derive(serde::Serialize)]
struct StatusRow {
    /// Where it was asked.
    address: String,
    /// `leader`, `standby` or `unreachable`.
    role: &'static str,
    /// Why it is unreachable; empty otherwise.
    error: String,
    /// The rest as the controller answered (zero values when unreachable).
    controller: String,
    leading: bool,
    leader: String,
    leader_address: String,
    leader_since_unix_ms: i64,
    lease_version: u64,
    lease_duration_ms: i64,
    store: String,
}

impl StatusRow {
    fn answered(address: String, s: pb::ControllerStatusResponse) -> StatusRow {
        StatusRow {
            address,
            role: if s.leading { "leader" } else { "standby" },
            error: String::new(),
            controller: s.controller,
            leading: s.leading,
            leader: s.leader,
            leader_address: s.leader_address,
            leader_since_unix_ms: s.leader_since_unix_ms,
            lease_version: s.lease_version,
            lease_duration_ms: s.lease_duration_ms,
            store: s.store,
        }
    }

    fn unreachable(address: String, error: String) -> StatusRow {
        StatusRow {
            address,
            role: "unreachable",
            error,
            controller: String::new(),
            leading: false,
            leader: String::new(),
            leader_address: String::new(),
            leader_since_unix_ms: 0,
            lease_version: 0,
            lease_duration_ms: 0,
            store: String::new(),
        }
    }
}

/// One controller asked for its status, within `deadline`.
async fn ask_status(reach: &client::Reach, i: usize, deadline: Deadline) -> StatusRow {
    let address = reach.targets()[i].to_string();
    let mut c = match reach.dial(i, deadline).await {
        Ok(c) => c,
        Err(e) => return StatusRow::unreachable(address, e.to_string()),
    };
    let call = c.controller_status(pb::ControllerStatusRequest {});
    match tokio::time::timeout_at(deadline.at(), call).await {
        Ok(Ok(r)) => StatusRow::answered(address, r.into_inner()),
        Ok(Err(s)) if s.code() == tonic::Code::Unimplemented => StatusRow::unreachable(
            address.clone(),
            format!(
                "the controller at {address} does not answer ControllerStatus (a gru older than this CLI?)"
            ),
        ),
        Ok(Err(s)) => {
            let e = client::explain_status(&address, s).to_string();
            StatusRow::unreachable(address, e)
        }
        Err(_) => StatusRow::unreachable(
            address.clone(),
            client::ReachError::NoAnswer {
                address,
                within: deadline.budget(),
                stage: client::Stage::Reply("ControllerStatus"),
            }
            .to_string(),
        ),
    }
}

/// A moment in this machine's time zone, with how long ago it was.
fn local_time_and_age(unix_ms: i64, now_ms: i64) -> String {
    if unix_ms <= 0 {
        return "-".to_owned();
    }
    let at = jiff::Timestamp::from_millisecond(unix_ms)
        .map(|t| {
            t.to_zoned_datetime(jiff::tz::TimeZone::system())
                .strftime("%Y-%m-%d %H:%M:%S %Z")
                .to_string()
        })
        .unwrap_or_else(|_| unix_ms.to_string());
    let ago = u64::try_from(now_ms.saturating_sub(unix_ms)).unwrap_or(0);
    format!("{at} ({} ago)", age(ago))
}

/// The leaders among `rows`: one controller reached at several addresses
/// (a name for every address of a host) is counted once, by its name and
/// store.
fn leaders(rows: &[StatusRow]) -> Vec<&StatusRow> {
    let mut seen = std::collections::BTreeSet::new();
    rows.iter()
        .filter(|r| r.leading && seen.insert((r.controller.as_str(), r.store.as_str())))
        .collect()
}

pub async fn controller_status(a: ControllerStatusArgs) -> anyhow::Result<()> {
    let deadline = a.common.deadline();
    let reach =
        client::Reach::load(a.common.config.as_deref(), &a.common.controller, deadline).await?;
    let rows: Vec<StatusRow> = futures::future::join_all(
        (0..reach.targets().len()).map(|i| ask_status(&reach, i, deadline)),
    )
    .await;
    if a.json {
        print_json(&rows)?;
    } else {
        let now_ms = std::time::SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let mut t = table(
            &[
                "ADDRESS",
                "CONTROLLER",
                "ROLE",
                "LEADER",
                "LEADER ADDRESS",
                "LEADING SINCE",
                "LEASE VERSION",
                "LEASE",
                "STORE",
            ],
            false,
        );
        let dash = |s: &str| {
            if s.is_empty() {
                "-".to_owned()
            } else {
                s.to_owned()
            }
        };
        for r in &rows {
            if r.role == "unreachable" {
                t.add_row(vec![
                    r.address.clone(),
                    "-".to_owned(),
                    format!("unreachable: {}", r.error),
                ]);
                continue;
            }
            // A store without a lease (SQLite): the controller leads alone.
            let leader = match (r.leader.as_str(), r.leading) {
                ("", true) => "(itself)".to_owned(),
                ("", false) => "none".to_owned(),
                (name, _) => name.to_owned(),
            };
            let (version, duration) = if r.lease_duration_ms > 0 {
                (
                    r.lease_version.to_string(),
                    humantime::format_duration(Duration::from_millis(r.lease_duration_ms as u64))
                        .to_string(),
                )
            } else {
                ("-".to_owned(), "none".to_owned())
            };
            t.add_row(vec![
                r.address.clone(),
                dash(&r.controller),
                r.role.to_owned(),
                leader,
                dash(&r.leader_address),
                local_time_and_age(r.leader_since_unix_ms, now_ms),
                version,
                duration,
                dash(&r.store),
            ]);
        }
        println!("{t}");
    }
    let leading = leaders(&rows);
    let unreachable = rows.iter().filter(|r| r.role == "unreachable").count();
    let asked = if unreachable > 0 {
        format!("{} asked, {unreachable} unreachable", rows.len())
    } else {
        format!("{} asked", rows.len())
    };
    match leading.as_slice() {
        [_] => Ok(()),
        [] => bail!("no controller says it leads ({asked})"),
        several => bail!(
            "{} controllers say they lead: {} ({asked})",
            several.len(),
            several
                .iter()
                .map(|r| format!("{} at {}", r.controller, r.address))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Prints one event: a JSON object, or a line with the time of day (the
/// full date with --since, which may reach back days).
fn print_event(e: &pb::Event, json: bool, full_time: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(e)?);
    } else {
        let who = if e.minion_id.is_empty() {
            String::new()
        } else {
            format!(" {}", e.minion_id)
        };
        let at = if full_time {
            when(e.at_unix_ms)
        } else {
            clock(e.at_unix_ms)
        };
        println!("{} {:<10} {}{}  {}", at, e.kind, e.fleet, who, e.message);
    }
    Ok(())
}

/// Connects and opens the event stream, both within `deadline`. The
/// [`Admin`] comes back too: its channel carries the stream.
async fn open_events(
    a: &EventsArgs,
    deadline: Deadline,
    since_unix_ms: Option<u64>,
) -> anyhow::Result<(Admin, tonic::Streaming<pb::Event>)> {
    let mut admin = a.common.connect(deadline).await?;
    let req = pb::WatchEventsRequest {
        fleet: a.fleet.clone().unwrap_or_default(),
        follow: a.follow,
        since_unix_ms,
    };
    let stream = admin
        .call("WatchEvents", async |c| c.watch_events(req.clone()).await)
        .await?;
    Ok((admin, stream))
}

/// What `events -f` printed lately, so that a reconnect, which asks for a
/// little more than it missed, prints nothing twice.
#[derive(Default)]
struct Printed {
    /// The newest event time printed.
    newest_ms: Option<u64>,
    /// Every event printed within [`RESUME_OVERLAP_MS`] of the newest.
    recent: Vec<pb::Event>,
}

impl Printed {
    /// True the first time `e` comes, which it then remembers.
    fn first_time(&mut self, e: &pb::Event) -> bool {
        if self.recent.contains(e) {
            return false;
        }
        let newest = self.newest_ms.unwrap_or(0).max(e.at_unix_ms);
        self.newest_ms = Some(newest);
        let floor = newest.saturating_sub(RESUME_OVERLAP_MS);
        self.recent.retain(|r| r.at_unix_ms >= floor);
        if e.at_unix_ms >= floor {
            self.recent.push(e.clone());
        }
        true
    }

    /// Where a reconnect resumes: a little before the newest event printed;
    /// with none printed, where the first stream started (every event of
    /// the log when it had none: the first stream would have shown them).
    fn resume_since(&self, first: Option<u64>) -> u64 {
        match self.newest_ms {
            Some(newest) => newest.saturating_sub(RESUME_OVERLAP_MS),
            None => first.unwrap_or(0),
        }
    }
}

/// A follow stream that broke because the connection did (the controller
/// stopped, was killed, or restarted), rather than a refusal of the call.
fn stream_lost(s: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        s.code(),
        Code::Unknown
            | Code::Unavailable
            | Code::Internal
            | Code::Cancelled
            | Code::Aborted
            | Code::DeadlineExceeded
    )
}

pub async fn events(a: EventsArgs) -> anyhow::Result<()> {
    let since_unix_ms = a.since.map(|t| {
        t.duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    });
    let full_time = since_unix_ms.is_some();
    let deadline = a.common.deadline();
    let (admin, mut stream) = open_events(&a, deadline, since_unix_ms).await?;
    if !a.follow {
        return client::within(&admin.to, "WatchEvents", async {
            while let Some(e) = stream
                .message()
                .await
                .map_err(|s| client::explain(&admin.to.address, s))?
            {
                print_event(&e, a.json, full_time)?;
            }
            Ok(())
        })
        .await;
    }
    let mut admin = admin;
    let mut printed = Printed::default();
    loop {
        // Read until the controller closes the stream.
        let lost = loop {
            match stream.message().await {
                Ok(Some(e)) => {
                    if printed.first_time(&e) {
                        print_event(&e, a.json, full_time)?;
                    }
                }
                Ok(None) => break "it ended the stream",
                Err(s) if stream_lost(&s) => break "the connection was lost",
                Err(s) => return Err(client::explain(&admin.to.address, s)),
            }
        };
        let address = admin.to.address.clone();
        if a.no_retry {
            bail!("the controller at {address} closed the event stream ({lost})");
        }
        let mut delay = RECONNECT_FIRST;
        eprintln!(
            "the controller at {address} closed the event stream; reconnecting in {}…",
            humantime::format_duration(delay)
        );
        (admin, stream) = loop {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(RECONNECT_MAX);
            let since = printed.resume_since(since_unix_ms);
            match open_events(&a, a.common.deadline(), Some(since)).await {
                Ok(opened) => break opened,
                Err(e) if client::is_transient(&e) => {
                    eprintln!("{e:#}; retrying in {}…", humantime::format_duration(delay))
                }
                Err(e) => return Err(e),
            }
        };
        eprintln!(
            "reconnected to the controller at {}; following its events again",
            admin.to.address
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(at: u64, message: &str) -> pb::Event {
        pb::Event {
            at_unix_ms: at,
            fleet: "local".to_owned(),
            kind: "admin".to_owned(),
            message: message.to_owned(),
            ..Default::default()
        }
    }

    #[test]
    fn a_resumed_stream_prints_no_event_twice() {
        let mut p = Printed::default();
        assert_eq!(p.resume_since(None), 0, "nothing printed: the whole log");
        assert_eq!(p.resume_since(Some(7)), 7, "nothing printed: from --since");
        assert!(p.first_time(&event(10_000, "a")));
        assert!(p.first_time(&event(12_000, "b")));
        assert!(
            p.first_time(&event(12_000, "c")),
            "same moment, another event"
        );
        assert_eq!(p.resume_since(None), 7_000);
        // The reconnect's backlog repeats what was printed, then goes on.
        assert!(!p.first_time(&event(10_000, "a")));
        assert!(!p.first_time(&event(12_000, "b")));
        assert!(!p.first_time(&event(12_000, "c")));
        assert!(p.first_time(&event(12_500, "d")));
        // Events older than the overlap are forgotten; the set stays small.
        assert!(p.first_time(&event(20_000, "e")));
        assert_eq!(p.recent.len(), 1);
        assert_eq!(p.resume_since(None), 15_000);
    }

    #[test]
    fn tables_fit_columns_else_the_terminal_else_no_limit() {
        assert_eq!(table_width(Some("80"), Some(200)), Some(80));
        assert_eq!(table_width(None, Some(120)), Some(120));
        assert_eq!(table_width(Some("wide"), Some(120)), Some(120));
        assert_eq!(table_width(Some("0"), None), None);
        assert_eq!(table_width(None, None), None);
    }

    #[test]
    fn ages_keep_their_two_largest_units() {
        assert_eq!(age(7_000), "7s");
        assert_eq!(age(67_000), "1m 7s");
        assert_eq!(age(3_723_000), "1h 2m");
    }
}
