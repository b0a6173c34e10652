//! `gru bench agent`: what a minion agent costs its instance when nothing
//! happens, at the report interval minions run with (1 s).
//!
//! For each engine kind it starts a real `gru controller` (a child, with a
//! local fleet of one minion) whose minion runs that engine idle: the
//! reference engine with no traffic, or the `exec` adapter polling a stub
//! engine (`echo 0` for its queue depth). Once the minion is in service it
//! samples the minion process from /proc for the given time: CPU (its own,
//! and with the commands it ran: the exec adapter's polls are processes)
//! and memory (RSS now and at its peak).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::{Args, ValueEnum};
use gru_controller::pki::DevPki;
use serde::Serialize;
use serde_json::Value;
use tokio::process::{Child, Command};

use super::{end_progress, progress};

/// Linux's USER_HZ: the unit of /proc/<pid>/stat's CPU times on every
/// mainstream kernel configuration (sysconf would need unsafe code).
pub(super) const TICKS_PER_SEC: f64 = 100.0;
/// How long the minion may take to come into service.
const START: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AgentEngine {
    /// gru's own engine, inside the agent, with no traffic.
    Reference,
    /// The exec adapter polling a stub engine (`echo 0`) every second.
    Exec,
}

#[derive(Args)]
pub struct AgentArgs {
    /// How long to sample each agent once it is in service.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Which engines to run the agent with, in turn.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "reference,exec"
    )]
    engines: Vec<AgentEngine>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
pub struct AgentRow {
    engine: AgentEngine,
    sampled_secs: f64,
    /// The agent process's own CPU, as a share of one core (percent).
    cpu_percent: f64,
    /// With the commands it ran and waited for (the exec adapter's polls).
    cpu_percent_with_commands: f64,
    rss_mib: f64,
    peak_rss_mib: f64,
}

/// CPU ticks and memory of a process, from /proc.
pub(super) struct Sample {
    pub own_ticks: u64,
    pub child_ticks: u64,
    pub rss_kib: u64,
    pub peak_kib: u64,
}

pub(super) fn sample(pid: u32) -> anyhow::Result<Sample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("process {pid} is gone"))?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat
        .rsplit_once(") ")
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("unreadable /proc/{pid}/stat"))?;
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime, stime, cutime, cstime are fields 14-17 of stat; 12-15 here.
    let field = |i: usize| f.get(i).copied().unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Ok(Sample {
        own_ticks: field(11) + field(12),
        child_ticks: field(13) + field(14),
        rss_kib: kib("VmRSS:"),
        peak_kib: kib("VmHWM:"),
    })
}

fn minion_toml(engine: AgentEngine, sink: &str) -> String {
    let head = "controller = \"https://CONTROLLER\"\nca_file = \"ca.pem\"\nfleet = \"bench\"\n\
                join_token_file = \"join-token\"\n";
    match engine {
        AgentEngine::Reference => {
            format!("{head}[engine]\nlisten = \"127.0.0.1:0\"\ndownstream = \"{sink}\"\n")
        }
        AgentEngine::Exec => format!(
            "{head}[engine]\nkind = \"exec\"\nadvertise = \"127.0.0.1:9\"\npoll_interval = \"1s\"\n\
             [engine.exec]\nqueue_depth = [\"echo\", \"0\"]\ndrain = [\"true\"]\nresume = [\"true\"]\n"
        ),
    }
}

/// A controller with one local minion running `engine`, in `dir`.
async fn controller(dir: &Path, engine: AgentEngine) -> anyhow::Result<(Child, PathBuf)> {
    DevPki::in_dir(dir).ensure().map_err(|e| anyhow!("{e}"))?;
    std::fs::write(dir.join("join-token"), "bench-agent-token")?;
    // A port of its own for the controller, picked before it starts: the
    // minion config it hands its minions names it (as `gru dev` does).
    let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = probe.local_addr()?;
    drop(probe);
    // The reference engine's downstream is never used: no traffic.
    let toml = minion_toml(engine, "127.0.0.1:9").replace("CONTROLLER", &addr.to_string());
    std::fs::write(dir.join("minion.toml"), toml)?;
    std::fs::write(
        dir.join("controller.toml"),
        format!(
            "listen = \"{addr}\"\njoin_token_file = \"join-token\"\nstate_dir = \"state\"\n\
             report_interval = \"1s\"\n\
             [tls]\ncert = \"controller.pem\"\nkey = \"controller.key\"\nclient_ca = \"ca.pem\"\n\
             [[fleet]]\nname = \"bench\"\nprovider = \"local\"\nmin = 1\nmax = 1\n\
             [fleet.local]\nlisten = \"127.0.0.1:0\"\nminion_config = \"minion.toml\"\n"
        ),
    )?;
    let log = std::fs::File::create(dir.join("controller.log"))?;
    let child = Command::new(std::env::current_exe()?)
        .args(["controller", "--config"])
        .arg(dir.join("controller.toml"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("cannot start gru controller")?;
    Ok((child, dir.join("state/local-instances.json")))
}

/// The minion's pid once the local provider has started it.
async fn minion_pid(state_file: &Path) -> anyhow::Result<u32> {
    let started = Instant::now();
    loop {
        let pid = std::fs::read_to_string(state_file)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|v| v["groups"]["bench"][0]["pid"].as_u64());
        if let Some(pid) = pid.and_then(|p| u32::try_from(p).ok()) {
            return Ok(pid);
        }
        if started.elapsed() > START {
            bail!("no minion started within {START:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One engine's row: start, warm up, sample, stop.
async fn run_one(engine: AgentEngine, duration: Duration) -> anyhow::Result<AgentRow> {
    let dir = tempfile::tempdir()?;
    let (mut child, state_file) = controller(dir.path(), engine).await?;
    let pid = minion_pid(&state_file).await?;
    // Past its start-up: the engine up, joined, first reports sent.
    let warm = Instant::now();
    while warm.elapsed() < Duration::from_secs(5) {
        if let Some(status) = child.try_wait()? {
            bail!("gru controller exited with {status}");
        }
        progress(&format!("agent ({engine:?}): warming up"));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let first = sample(pid)?;
    let t0 = Instant::now();
    while t0.elapsed() < duration {
        progress(&format!(
            "agent ({engine:?}): sampling {:.0}s/{:.0}s",
            t0.elapsed().as_secs_f64(),
            duration.as_secs_f64()
        ));
        tokio::time::sleep(Duration::from_secs(1).min(duration.saturating_sub(t0.elapsed()))).await;
    }
    let last = sample(pid)?;
    let secs = t0.elapsed().as_secs_f64();
    end_progress();
    if let Some(id) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &id.to_string()])
            .status();
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    let share = |ticks: u64| ticks as f64 / TICKS_PER_SEC / secs * 100.0;
    Ok(AgentRow {
        engine,
        sampled_secs: secs,
        cpu_percent: share(last.own_ticks - first.own_ticks),
        cpu_percent_with_commands: share(
            (last.own_ticks + last.child_ticks) - (first.own_ticks + first.child_ticks),
        ),
        rss_mib: last.rss_kib as f64 / 1024.0,
        peak_rss_mib: last.peak_kib as f64 / 1024.0,
    })
}

pub async fn run(a: AgentArgs) -> anyhow::Result<()> {
    if a.duration < Duration::from_secs(5) {
        bail!("--duration: at least 5s (CPU time is counted in hundredths of a second)");
    }
    let mut rows = Vec::new();
    for engine in &a.engines {
        rows.push(run_one(*engine, a.duration).await?);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<10} {:>8} {:>10} {:>16} {:>9} {:>9}",
        "engine", "sampled", "cpu %", "cpu % w/ cmds", "RSS MiB", "peak MiB"
    );
    for r in &rows {
        println!(
            "{:<10} {:>7.0}s {:>10.3} {:>16.3} {:>9.1} {:>9.1}",
            format!("{:?}", r.engine).to_lowercase(),
            r.sampled_secs,
            r.cpu_percent,
            r.cpu_percent_with_commands,
            r.rss_mib,
            r.peak_rss_mib
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_samples_itself() {
        let s = sample(std::process::id()).expect("sample");
        assert!(s.rss_kib > 0 && s.peak_kib >= s.rss_kib);
    }
}
