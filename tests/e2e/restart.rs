//! The controller remembers: `gru dev` killed with SIGKILL in the middle of
//! a scale-in, under MLLP load, and started again on the same state
//! directory. Its minions outlive it and are adopted; the drain finishes
//! where it stopped; nothing ACKed is lost.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

use crate::harness::{
    Dev, GRU, Proc, Sink, drive, drive_summary, processes_mentioning, read_lines, wait_until,
};

const WAIT: Duration = Duration::from_secs(60);

/// `gru events -f --json` against a `gru dev`, its lines on a channel.
struct Follower {
    _proc: Proc,
    lines: mpsc::Receiver<Value>,
}

impl Follower {
    fn start(dev: &Dev) -> Follower {
        let mut cmd = Command::new(GRU);
        cmd.args(["events", "-f", "--json"])
            .env("GRU_CONFIG", dev.state_dir().join("client.toml"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut proc = Proc::spawn("gru events -f", &mut cmd);
        let out = BufReader::new(proc.child.stdout.take().expect("stdout"));
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && tx.send(v).is_err()
                {
                    return;
                }
            }
        });
        Follower { _proc: proc, lines }
    }

    /// The first event for which `f` holds, within `deadline`.
    fn until(&self, what: &str, deadline: Duration, f: impl Fn(&Value) -> bool) -> Value {
        let end = std::time::Instant::now() + deadline;
        loop {
            let left = end.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(e) if f(&e) => return e,
                Ok(_) => {}
                Err(_) => panic!("no event {what} within {deadline:?}"),
            }
        }
    }
}

/// Every event about `minion` in the controller's event log, oldest first.
fn events_about(dev: &Dev, minion: &str) -> Vec<Value> {
    let out = dev.gru(&["events", "--since", "1h", "--json"]);
    assert!(
        out.status.success(),
        "gru events failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["minion_id"] == minion)
        .collect()
}

fn ok(dev: &Dev, args: &[&str]) {
    let out = dev.gru(args);
    assert!(
        out.status.success(),
        "gru {} failed: {}\n--- gru dev log ---\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr),
        dev.log()
    );
}

/// Killed twice in one scale-in (while the victim flushes, then at its next
/// step), started again each time: the victim is drained and terminated
/// once, never registered again, the survivor keeps its id, the pin holds,
/// and every message the driver saw ACKed is at the sink.
#[test]
fn gru_dev_killed_mid_drain_finishes_it_after_restart_and_loses_nothing() {
    // A slow downstream, so the victim has work to flush.
    let sink = Sink::start_with("127.0.0.1:0", &["--ack-delay", "20ms"]);
    let downstream = sink.addr.to_string();
    let args = [
        "--min",
        "0",
        "--max",
        "3",
        "--downstream",
        &downstream,
        "--max-connection-age",
        "0s",
    ];
    let mut dev = Dev::start(&args);
    ok(&dev, &["scale", "local", "2"]);
    dev.wait_in_service(2, WAIT);
    let marker = dev.state_dir().join("minion.toml");
    let record = dev.dir.path().join("acked.txt");
    let driver = drive(
        dev.load_balancer,
        &record,
        &["--rate", "0", "--connections", "8", "--duration", "20s"],
    );
    wait_until("load on both minions", WAIT, || {
        let busy = dev
            .minions(false)
            .iter()
            .filter(|m| m["processed_total"].as_u64().unwrap_or(0) > 0)
            .count();
        (busy == 2).then_some(())
    });

    let events = Follower::start(&dev);
    ok(&dev, &["scale", "local", "1"]);
    let flushing = events.until("of a minion flushing", WAIT, |e| {
        e["to"] == "Draining/Flushing"
    });
    dev.kill();
    let victim = flushing["minion_id"]
        .as_str()
        .expect("minion id")
        .to_owned();
    assert_eq!(
        processes_mentioning(&marker).len(),
        2,
        "the minions outlive their controller"
    );

    let dev = dev.restart(&args);
    let events = Follower::start(&dev);
    // The backlog replays the log; the first step after it is the victim's
    // next one, where the second kill lands.
    let next = events.until("of the victim's next step", WAIT, |e| {
        e["minion_id"] == victim.as_str()
            && e["kind"] == "transition"
            && e["from"] != "Draining/Deregistering"
            && e["to"] != "Draining/Flushing"
            && e["at_unix_ms"].as_u64() > flushing["at_unix_ms"].as_u64()
    });
    let mut dev = dev;
    dev.kill();
    eprintln!(
        "second kill after the victim went {} -> {}",
        next["from"], next["to"]
    );

    let dev = dev.restart(&args);
    let gone = wait_until("the victim to be gone", WAIT, || {
        dev.minions(true)
            .into_iter()
            .find(|m| m["id"] == victim.as_str() && m["state"] == "Gone")
    });
    let path: Vec<&str> = gone["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter_map(|h| h["to"].as_str())
        .collect();
    let drain_began = path
        .iter()
        .position(|s| s.starts_with("Draining/"))
        .expect("drained");
    assert!(
        !path[drain_began..]
            .iter()
            .any(|s| matches!(*s, "Ready" | "InService")),
        "never back in service after its drain began: {path:?}"
    );
    assert_eq!(
        &path[path.len() - 3..],
        ["Drained", "Terminating", "Gone"],
        "{path:?}"
    );
    let about = events_about(&dev, &victim);
    let says = |what: &str| {
        about
            .iter()
            .filter(|e| e["message"].as_str().is_some_and(|m| m.contains(what)))
            .count()
    };
    assert_eq!(says("desired capacity decremented"), 1, "{about:#?}");
    let registered_after_drain = about
        .iter()
        .skip_while(|e| e["to"] != "Draining/Deregistering")
        .any(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.contains("registered") && !m.contains("deregistered"))
        });
    assert!(!registered_after_drain, "{about:#?}");

    // The survivor kept its id; the pin held across both restarts.
    let fleet = dev.fleet();
    assert_eq!(fleet["pinned"], 1, "{fleet:#?}");
    assert_eq!(fleet["in_service"], 1, "{fleet:#?}");

    let summary = drive_summary(driver, WAIT);
    let acked = read_lines(&record);
    assert!(!acked.is_empty(), "the driver got ACKs: {summary}");
    dev.stop();
    let received: HashSet<String> = sink.stop();
    let lost: Vec<&String> = acked.difference(&received).collect();
    assert!(
        lost.is_empty(),
        "{} ACKed messages never reached the sink, e.g. {:?}",
        lost.len(),
        lost.iter().take(5).collect::<Vec<_>>()
    );
}

/// Pause, pin with an expiry, minion ids and the event log are the same
/// after `gru dev` is killed and started again on the same state directory;
/// a graceful stop then leaves no minion behind.
#[test]
fn pause_pin_ids_and_events_survive_a_gru_dev_restart() {
    let args = ["--min", "0", "--max", "3"];
    let mut dev = Dev::start(&args);
    ok(&dev, &["scale", "local", "2", "--for", "2h"]);
    dev.wait_in_service(2, WAIT);
    ok(&dev, &["pause", "local"]);
    let before = dev.fleet();
    let ids: HashSet<String> = dev
        .minions(false)
        .iter()
        .map(|m| m["id"].as_str().expect("id").to_owned())
        .collect();
    let marker = dev.state_dir().join("minion.toml");
    let pids: HashSet<u32> = processes_mentioning(&marker).into_iter().collect();
    dev.kill();

    let dev = dev.restart(&args);
    dev.wait_in_service(2, WAIT);
    let after = dev.fleet();
    assert_eq!(after["paused"], true, "{after:#?}");
    assert_eq!(after["pinned"], 2, "{after:#?}");
    assert_eq!(
        after["pinned_until_unix_ms"], before["pinned_until_unix_ms"],
        "the same expiry"
    );
    assert!(
        after["paused_by"]
            .as_str()
            .is_some_and(|b| b.contains("CN=")),
        "who paused it: {after:#?}"
    );
    let again: HashSet<String> = dev
        .minions(false)
        .iter()
        .map(|m| m["id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(ids, again, "the same minions, with the same ids");
    assert_eq!(
        pids,
        processes_mentioning(&marker).into_iter().collect(),
        "adopted, not relaunched"
    );
    // The log from before the restart.
    let out = dev.gru(&["events", "--since", "1h", "--json"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines().any(|l| l.contains("paused: decisions")),
        "{text}"
    );
    dev.stop();
}
