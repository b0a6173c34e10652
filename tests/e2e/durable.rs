//! The reference engine's durable queue, killed for real: every message it
//! ACKed (after writing it to its log) reaches the sink after a restart.

use std::io::BufReader;
use std::path::Path;
use std::time::Duration;

use crate::harness::{
    Proc, Sink, bench_engine, drive, drive_summary, free_port, read_lines, wait_until,
};

fn engine(downstream: &str, queue: &Path) -> (Proc, String, BufReader<std::process::ChildStdout>) {
    let queue = queue.to_str().expect("utf-8 path");
    bench_engine(&[
        "--ack",
        "after-enqueue",
        "--downstream",
        downstream,
        "--queue-dir",
        queue,
    ])
}

/// Bytes in the log's segment files (`*.wal`) under `queue`, 0 before the
/// engine created it.
fn wal_bytes(queue: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(queue) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "wal"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

#[test]
fn a_durable_engine_killed_mid_load_delivers_every_acked_message_after_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let queue = dir.path().join("queue");
    // The downstream is down at first: ACKed messages can only be in the log.
    let port = free_port();
    let downstream = format!("127.0.0.1:{port}");
    let (mut first, addr, _out) = engine(&downstream, &queue);
    let acked_file = dir.path().join("acked.txt");
    let driver = drive(
        addr.parse().expect("addr"),
        &acked_file,
        &["--rate", "400", "--duration", "5s", "--connections", "4"],
    );
    // Mid-load: SIGKILL once the log holds at least 120 messages' worth of
    // records (the engine ACKs only after writing them), while the driver is
    // still sending.
    let wanted = 120 * gru_engine::bench::DEFAULT_MESSAGE_BYTES as u64;
    wait_until("the durable log to grow", Duration::from_secs(4), || {
        (wal_bytes(&queue) >= wanted).then_some(())
    });
    first.child.kill().expect("kill -9");
    let _ = first.child.wait();
    let summary = drive_summary(driver, Duration::from_secs(30));
    let acked = read_lines(&acked_file);
    assert!(
        acked.len() > 100,
        "the engine ACKed messages before it died: {summary}"
    );

    // The downstream comes up; the engine restarts on the same log and is
    // stopped with SIGTERM, which drains its queue before it exits.
    let sink = Sink::start_on(&downstream);
    let (mut second, _, mut out) = engine(&downstream, &queue);
    std::thread::sleep(Duration::from_millis(500));
    let status = second.stop(Duration::from_secs(30));
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut out, &mut rest);
    assert!(status.success(), "restarted engine: {status} {rest}");
    assert!(
        rest.contains("left queued 0 in flight 0"),
        "drained before exit: {rest}"
    );
    let received = sink.stop();
    let lost: Vec<&String> = acked.iter().filter(|id| !received.contains(*id)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} ACKed messages lost, e.g. {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(5)]
    );
}
