//! The controller's front door under a flood of connections that never
//! start TLS: they are dropped after the handshake deadline, only so many
//! are held at once, and a minion's Session keeps reporting throughout.

use std::time::Duration;

use gru_controller::front_door::{HANDSHAKE_TIMEOUT, MAX_HANDSHAKES};
use tokio::io::AsyncReadExt;

use super::metrics::{get, value};
use super::*;

/// Descriptors this process has open.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_shed_while_a_minion_keeps_reporting() {
    let fx = start_sized(&["i-1"], 1, 1).await;
    // A minion reporting every 100 ms for as long as the test runs.
    let _session = reporting_minion(&fx, "i-1").await;
    let reports = || async {
        let (_, body) = get(fx.metrics, "/metrics").await;
        value(&body, r#"gru_minion_reports_total{fleet="local"}"#).unwrap_or(0.0)
    };

    // More idle connections than the controller handshakes at once.
    let flood = MAX_HANDSHAKES + 44;
    let baseline = open_fds();
    let mut idle = Vec::new();
    for _ in 0..flood {
        idle.push(
            tokio::net::TcpStream::connect(fx.addr)
                .await
                .expect("connect"),
        );
    }
    let before = reports().await;
    let started = Instant::now();

    // Each is closed by the controller (EOF or reset), never answered.
    let mut pending: Vec<_> = idle
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                matches!(s.read(&mut buf).await, Ok(0) | Err(_))
            })
        })
        .collect();
    let mut most_held = 0;
    let deadline = HANDSHAKE_TIMEOUT * 8;
    while !pending.is_empty() {
        assert!(
            started.elapsed() < deadline,
            "{} of {flood} idle connections still open after {deadline:?}",
            pending.len()
        );
        // Our side of the flood holds one descriptor per connection still
        // open; the controller's side at most one per handshake slot.
        let held_by_controller = open_fds().saturating_sub(baseline + pending.len());
        most_held = most_held.max(held_by_controller);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut still = Vec::new();
        for p in pending {
            if p.is_finished() {
                assert!(p.await.expect("reader"), "a connection got an answer");
            } else {
                still.push(p);
            }
        }
        pending = still;
    }
    let shed_in = started.elapsed();
    assert!(
        most_held <= MAX_HANDSHAKES + 16,
        "the controller held {most_held} descriptors for {flood} idle connections (bound {MAX_HANDSHAKES})"
    );
    // Shedding took at least two rounds of the deadline: the bound held
    // connections back in the backlog.
    assert!(
        shed_in >= HANDSHAKE_TIMEOUT,
        "shed in {shed_in:?}, before the handshake deadline"
    );

    // The Session reported all along: about one report per 100 ms.
    let after = reports().await;
    let expected = shed_in.as_secs_f64() * 10.0 / 2.0;
    assert!(
        after - before >= expected,
        "{} reports in {shed_in:?} while the flood was shed (want at least {expected})",
        after - before
    );
    // And the door is open to new clients again.
    let fleets = fx
        .admin()
        .await
        .list_fleets(pb::ListFleetsRequest {})
        .await
        .expect("fleet ls after the flood");
    assert_eq!(fleets.into_inner().fleets.len(), 1);
}
