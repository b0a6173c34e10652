//! The soak's short variant: 20,000 messages through `gru dev`'s load
//! balancer while the fleet is pinned at four new sizes, a minion is killed
//! with SIGKILL and the controller is killed with SIGKILL mid-drain. No
//! ACKed message may be lost (`bench/soak.sh` runs the long one).

use std::process::Command;

use serde_json::Value;

use crate::harness::GRU;

#[test]
fn twenty_thousand_messages_through_scale_events_and_kills_lose_no_acked_message() {
    let out = Command::new(GRU)
        .args([
            "bench",
            "soak",
            "--messages",
            "20000",
            "--rate",
            "1000",
            "--scale-events",
            "4",
            "--minion-kills",
            "1",
            "--controller-kills",
            "1",
            "--json",
        ])
        .output()
        .expect("run gru bench soak");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "gru bench soak failed:\n{stderr}");
    let r: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(r["acked_not_delivered"], 0, "{r:#}");
    assert!(
        r["sent"].as_u64() >= Some(20_000),
        "sent every message: {r:#}"
    );
    assert!(r["acked"].as_u64() > Some(0), "{r:#}");
    assert!(
        r["delivered"].as_u64() >= r["acked"].as_u64(),
        "every ACKed message is at the sink: {r:#}"
    );
    assert_eq!(r["scale_events"], 4, "{r:#}");
    assert_eq!(r["minion_kills"], 1, "{r:#}");
    assert_eq!(r["controller_kills"], 1, "{r:#}");
    let kill = r["events"]
        .as_array()
        .expect("events")
        .iter()
        .find(|e| e["kind"] == "controller-kill")
        .expect("a controller kill");
    assert!(
        kill["detail"]
            .as_str()
            .is_some_and(|d| d.contains("while a minion was Draining/")),
        "{kill}"
    );
}
