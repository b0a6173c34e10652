//! `gru bench`, run as a user runs it: the suite's table rows, the DRIVER's
//! own SINKs and their loss check, and refusals of impossible settings.

use std::process::{Command, Stdio};

use serde_json::Value;

use crate::harness::{GRU, Proc, bench_engine, free_port};

fn run(args: &[&str]) -> std::process::Output {
    Command::new(GRU)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run gru")
}

#[test]
fn suite_runs_t1_and_t4_without_ack_in_memory_and_durable_with_no_loss() {
    let out = run(&[
        "bench",
        "suite",
        "--duration",
        "1s",
        "--connections",
        "2",
        "--size",
        "2000",
        "--workload",
        "t1,t4-no-ack",
        "--json",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "suite failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Value> = serde_json::from_str(&stdout).expect("JSON rows");
    let keys: Vec<(String, String)> = rows
        .iter()
        .map(|r| {
            (
                r["workload"].as_str().expect("workload").to_owned(),
                r["mode"].as_str().expect("mode").to_owned(),
            )
        })
        .collect();
    let want = [
        ("t1", "memory"),
        ("t1", "durable"),
        ("t4-no-ack", "memory"),
        ("t4-no-ack", "durable"),
    ];
    assert_eq!(
        keys,
        want.map(|(w, m)| (w.to_owned(), m.to_owned())).to_vec()
    );
    for r in &rows {
        assert_eq!(r["lost"], 0, "{r}");
        assert_eq!(r["errors"], 0, "{r}");
        assert!(r["received_per_sec"].as_f64().expect("rate") > 0.0, "{r}");
        let sent = r["sent"].as_u64().expect("sent");
        assert!(sent > 0, "{r}");
        if r["workload"] == "t1" {
            assert_eq!(r["acked"].as_u64(), Some(sent), "{r}");
            assert!(r["latency_p99_ms"].as_f64().expect("p99") > 0.0, "{r}");
        } else {
            assert_eq!(r["acked"], 0, "nothing is ACKed without ACKs: {r}");
        }
    }
}

/// The engine is started first, pointing at a port the driver's own SINK
/// then listens on.
fn engine_to(downstream: u16, extra: &[&str]) -> (Proc, String) {
    let downstream = format!("127.0.0.1:{downstream}");
    let mut args = vec!["--downstream", &downstream];
    args.extend_from_slice(extra);
    let (proc, addr, _out) = bench_engine(&args);
    (proc, addr)
}

#[test]
fn drive_with_its_own_sink_checks_every_acked_message_arrived() {
    let port = free_port();
    let (_engine, addr) = engine_to(port, &[]);
    let sink = format!("127.0.0.1:{port}");
    let out = run(&[
        "bench",
        "drive",
        "--target",
        &addr,
        "--rate",
        "300",
        "--duration",
        "1s",
        "--connections",
        "3",
        "--mix",
        "adt-a08=1,oru-r01=1",
        "--sink",
        &sink,
        "--json",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "drive failed: {stdout}");
    let s: Value = serde_json::from_str(&stdout).expect("JSON summary");
    let acked = s["acked"].as_u64().expect("acked");
    assert!(acked > 100, "{s}");
    assert_eq!(s["lost"], 0, "{s}");
    assert_eq!(s["sinks"][0]["listen"], sink.as_str(), "{s}");
    assert_eq!(s["sinks"][0]["unique"].as_u64(), Some(acked), "{s}");
    assert!(s["received_per_sec"].as_f64().expect("rate") > 50.0, "{s}");
}

#[test]
fn drive_fails_when_its_sink_misses_acked_messages() {
    // The engine delivers to one SINK (a separate process); the driver
    // watches another that gets nothing: every ACKed message is "lost" there.
    let delivered_to = crate::harness::Sink::start();
    let (_engine, addr) = engine_to(delivered_to.addr.port(), &[]);
    let watched = format!("127.0.0.1:{}", free_port());
    let out = run(&[
        "bench",
        "drive",
        "--target",
        &addr,
        "--rate",
        "100",
        "--duration",
        "500ms",
        "--sink",
        &watched,
        "--settle",
        "300ms",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a loss must fail the run: {stdout}");
    assert!(stdout.contains("MESSAGES LOST"), "{stdout}");
    assert!(
        stderr.contains("message(s) ACKed never reached a sink"),
        "{stderr}"
    );
    let received = delivered_to.stop();
    assert!(!received.is_empty(), "the engine did deliver, elsewhere");
}

#[test]
fn impossible_sizes_and_mixes_are_refused_before_anything_starts() {
    for (flag, value, says) in [
        ("--size", "1048577", "at most 1048576 bytes (1 MiB)"),
        ("--size", "big", "expected a number of bytes"),
        ("--mix", "adt-a04=1", "unknown message kind \"adt-a04\""),
        (
            "--mix",
            "oru-r01=0",
            "at least one kind with a weight above 0",
        ),
    ] {
        let out = run(&["bench", "drive", "--target", "127.0.0.1:9", flag, value]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(stderr.contains(says), "{flag} {value}: {stderr}");
    }
}
