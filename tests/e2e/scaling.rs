//! Scale-out and scale-in under load: nothing ACKed is lost, each removed
//! minion leaves the load balancer before it drains, and it takes seconds.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{Dev, Sink, drive, drive_summary, read_lines, wait_until};

fn states(m: &Value) -> Vec<String> {
    let mut s: Vec<String> = m["history"]
        .as_array()
        .map(|h| {
            h.iter()
                .map(|t| t["from"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default();
    if let Some(last) = m["history"].as_array().and_then(|h| h.last()) {
        s.push(last["to"].as_str().unwrap_or_default().to_owned());
    }
    s
}

#[test]
fn scale_1_3_1_under_load_loses_nothing_and_drains_before_terminating() {
    let sink = Sink::start();
    let downstream = sink.addr.to_string();
    // The deregistration delay stays at ELB's 300 s: the scale-in must not wait for it.
    let dev = Dev::start(&[
        "--downstream",
        &downstream,
        "--min",
        "1",
        "--max",
        "4",
        "--max-connection-age",
        "2s",
    ]);
    dev.wait_in_service(1, Duration::from_secs(30));

    let out = dev.gru(&["scale", "local", "3", "--wait", "--timeout", "60s"]);
    assert!(
        out.status.success(),
        "scale to 3: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(dev.fleet()["in_service"], 3);

    let acked_file = dev.dir.path().join("acked.txt");
    let driver = drive(
        dev.load_balancer,
        &acked_file,
        &["--rate", "200", "--duration", "10s", "--connections", "6"],
    );
    // Every minion carries traffic before the scale-in starts.
    wait_until(
        "all three minions to process messages",
        Duration::from_secs(20),
        || {
            let m = dev.minions(false);
            (m.len() == 3
                && m.iter()
                    .all(|m| m["processed_total"].as_u64().unwrap_or(0) > 0))
            .then_some(())
        },
    );

    let started = Instant::now();
    let out = dev.gru(&["scale", "local", "1", "--wait", "--timeout", "120s"]);
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "scale to 1: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        dev.log()
    );
    assert!(
        took < Duration::from_secs(30),
        "scale-in took {took:?}: it must not wait out the 300 s deregistration delay"
    );

    let summary = drive_summary(driver, Duration::from_secs(60));
    let acked = read_lines(&acked_file);
    assert!(
        summary["acked"].as_u64().unwrap_or(0) > 500,
        "too little traffic: {summary}"
    );
    assert_eq!(summary["nacked"], 0, "{summary}");
    assert_eq!(acked.len() as u64, summary["acked"].as_u64().unwrap_or(0));

    let gone: Vec<Value> = dev
        .minions(true)
        .into_iter()
        .filter(|m| m["state"] == "Gone")
        .collect();
    assert_eq!(gone.len(), 2, "two minions removed");
    for m in &gone {
        let path = states(m);
        let tail: Vec<&str> = path.iter().map(String::as_str).rev().take(7).collect();
        assert_eq!(
            tail,
            [
                "Gone",
                "Terminating",
                "Drained",
                "Draining/AwaitingUnused",
                "Draining/Flushing",
                "Draining/Deregistering",
                "InService"
            ],
            "minion {} went {path:?}",
            m["id"]
        );
        let at_dereg = m["lb_connections_at_deregistration"]
            .as_u64()
            .expect("recorded at deregistration");
        let at_drain = m["lb_connections_at_drain_start"]
            .as_u64()
            .expect("recorded at drain start");
        assert_eq!(
            at_dereg, at_drain,
            "minion {} got new connections after deregistration",
            m["id"]
        );
    }

    dev.stop();
    let received = sink.stop();
    let lost: Vec<&String> = acked.iter().filter(|id| !received.contains(*id)).collect();
    assert!(
        lost.is_empty(),
        "{} ACKed messages never reached the sink, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
}

#[test]
fn after_a_scale_out_new_minions_get_traffic_within_max_connection_age() {
    let dev = Dev::start(&["--min", "1", "--max", "3", "--max-connection-age", "2s"]);
    let out = dev.gru(&["scale", "local", "1", "--wait"]);
    assert!(out.status.success());
    let acked_file = dev.dir.path().join("acked.txt");
    // Four long-lived connections, all on the first minion.
    let driver = drive(
        dev.load_balancer,
        &acked_file,
        &["--rate", "100", "--duration", "20s", "--connections", "4"],
    );
    let first = wait_until(
        "the first minion to take traffic",
        Duration::from_secs(15),
        || {
            let m = dev.minions(false);
            m.first()
                .filter(|m| m["processed_total"].as_u64().unwrap_or(0) > 0)
                .map(|m| m["id"].clone())
        },
    );

    let out = dev.gru(&["scale", "local", "2", "--wait", "--timeout", "60s"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let started = Instant::now();
    // Connections are closed at a message boundary after 2–4 s (jittered),
    // the sender reconnects through the load balancer, least-connections
    // puts it on the new minion; reports arrive every second.
    wait_until(
        "the new minion to process messages",
        Duration::from_secs(10),
        || {
            dev.minions(false)
                .into_iter()
                .find(|m| m["id"] != first && m["processed_total"].as_u64().unwrap_or(0) > 0)
        },
    );
    let took = started.elapsed();
    assert!(
        took <= Duration::from_secs(7),
        "new minion got traffic only after {took:?}"
    );

    let summary = drive_summary(driver, Duration::from_secs(60));
    assert_eq!(summary["nacked"], 0, "{summary}");
    assert!(summary["reconnects"].as_u64().unwrap_or(0) > 0, "{summary}");
    dev.stop();
}

#[test]
fn after_a_scale_out_connections_are_shed_onto_the_new_minions_within_seconds() {
    let sink = Sink::start();
    let downstream = sink.addr.to_string();
    // Connections never age out: only rebalancing can move them.
    let dev = Dev::start(&[
        "--downstream",
        &downstream,
        "--min",
        "1",
        "--max",
        "4",
        "--max-connection-age",
        "0s",
    ]);
    dev.wait_in_service(1, Duration::from_secs(30));
    let acked_file = dev.dir.path().join("acked.txt");
    let driver = drive(
        dev.load_balancer,
        &acked_file,
        &["--rate", "200", "--duration", "25s", "--connections", "16"],
    );
    let first = wait_until(
        "16 connections on the first minion",
        Duration::from_secs(15),
        || {
            let m = dev.minions(false);
            m.first()
                .filter(|m| m["open_connections"].as_u64() == Some(16))
                .map(|m| m["id"].clone())
        },
    );

    let out = dev.gru(&["scale", "local", "4", "--wait", "--timeout", "60s"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Each new minion: its share of the connections (16 / 4, give or take
    // the tolerance) and messages processed.
    let in_service = Instant::now();
    let spread = wait_until(
        "every minion to hold at least 2 connections and process messages",
        Duration::from_secs(15),
        || {
            let m = dev.minions(false);
            (m.len() == 4
                && m.iter().all(|m| {
                    m["open_connections"].as_u64().unwrap_or(0) >= 2
                        && m["processed_total"].as_u64().unwrap_or(0) > 0
                }))
            .then_some(m)
        },
    );
    eprintln!(
        "connections spread {:?} after the scale-out's --wait returned",
        in_service.elapsed()
    );
    let held: u64 = spread
        .iter()
        .map(|m| m["open_connections"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(held, 16, "every sender reconnected: {spread:?}");
    let out = dev.gru(&["events", "--fleet", "local", "--json"]);
    assert!(out.status.success());
    let events: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        events.iter().any(|e| e["minion_id"] == first
            && e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("asked to shed"))),
        "the first minion was asked to shed: {events:#?}"
    );

    let summary = drive_summary(driver, Duration::from_secs(60));
    assert_eq!(summary["nacked"], 0, "{summary}");
    assert_eq!(summary["errors"], 0, "{summary}");
    // At least two senders moved onto each of the three new minions.
    assert!(
        summary["reconnects"].as_u64().unwrap_or(0) >= 6,
        "{summary}"
    );
    let acked = read_lines(&acked_file);
    assert_eq!(acked.len() as u64, summary["acked"].as_u64().unwrap_or(0));
    let minion_logs: String = std::fs::read_dir(dev.state_dir().join("minions"))
        .expect("minion logs")
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .collect();
    assert!(!minion_logs.is_empty(), "no minion log under the state dir");
    dev.stop();
    let received = sink.stop();
    let lost: Vec<&String> = acked.iter().filter(|id| !received.contains(*id)).collect();
    assert!(
        lost.is_empty(),
        "{} ACKed messages never reached the sink, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    assert!(
        !minion_logs.contains("rest of a frame"),
        "a connection was closed inside a frame:\n{minion_logs}"
    );
}

#[test]
fn queue_depth_drives_scale_out_and_idle_scales_back_in() {
    // A slow downstream (20 ms per ACK) makes messages queue on the minions.
    let dev = Dev::start(&[
        "--min",
        "1",
        "--max",
        "3",
        "--target-queue",
        "2",
        "--sink-ack-delay",
        "20ms",
        "--scale-in-stabilization",
        "3s",
        "--max-connection-age",
        "1s",
    ]);
    dev.wait_in_service(1, Duration::from_secs(30));
    let acked_file = dev.dir.path().join("acked.txt");
    let driver = drive(
        dev.load_balancer,
        &acked_file,
        &["--rate", "0", "--duration", "8s", "--connections", "12"],
    );
    wait_until(
        "the policy to scale out on queue depth",
        Duration::from_secs(20),
        || (dev.fleet()["in_service"].as_u64().unwrap_or(0) >= 2).then_some(()),
    );
    let summary = drive_summary(driver, Duration::from_secs(60));
    assert_eq!(summary["nacked"], 0, "{summary}");
    // Idle: after the scale-in window the fleet returns to its minimum.
    dev.wait_in_service(1, Duration::from_secs(30));
    let gone = dev
        .minions(true)
        .into_iter()
        .filter(|m| m["state"] == "Gone")
        .count();
    assert!(gone >= 1, "a minion was removed");
    dev.stop();
}

#[test]
fn the_controller_follows_a_schedule_window_in_a_time_zone() {
    // A window around the current time in Asia/Kolkata (UTC+05:30), which
    // sets min 2: the fleet (min 1) must grow to 2 and say why.
    let zone = "Asia/Kolkata";
    let local = jiff::Timestamp::now().in_tz(zone).expect("zone");
    let from = local.saturating_sub(jiff::SignedDuration::from_hours(1));
    let to = local.saturating_add(jiff::SignedDuration::from_hours(1));
    let dir = tempfile::tempdir().expect("tempdir");
    let schedules = dir.path().join("schedules.toml");
    std::fs::write(
        &schedules,
        format!(
            "[[fleet.schedule]]\nname = \"busy-now\"\ntimezone = \"{zone}\"\ndays = \"*\"\nfrom = \"{}\"\nto = \"{}\"\nmin = 2\n",
            from.strftime("%H:%M"),
            to.strftime("%H:%M")
        ),
    )
    .expect("write");
    let schedules = schedules.to_string_lossy().into_owned();
    let dev = Dev::start(&["--min", "1", "--max", "3", "--schedules", &schedules]);
    dev.wait_in_service(2, Duration::from_secs(30));
    let d = dev.json(&["explain", "local"]);
    assert_eq!(d["active_window"], "busy-now", "{d}");
    assert_eq!(d["desired"], 2, "{d}");
    assert!(
        d["text"].as_str().unwrap_or_default().contains("busy-now"),
        "{d}"
    );
    // The forecast is on in forecast_only mode by default: it says it has
    // no day of history yet, and recommends nothing.
    let forecast = d["recommendations"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["rule"] == "forecast (only)"))
        .unwrap_or_else(|| panic!("no forecast line in {d}"));
    assert!(forecast["desired"].is_null(), "{forecast}");
    assert!(
        forecast["detail"]
            .as_str()
            .unwrap_or_default()
            .ends_with("of the 24h needed"),
        "{forecast}"
    );
    assert!(
        dev.fleet()["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("window busy-now")
    );
    dev.stop();
}
