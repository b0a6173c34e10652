//! `gru bench agent`, `gru bench breach` and `gru bench controller` run end to end and report what
//! they say they measure. Their figures are read by people (README,
//! closing notes), never asserted against a speed: these check that every
//! field is there and means something.

use std::process::Command;

use serde_json::Value;

use crate::harness::GRU;

fn bench(args: &[&str]) -> Value {
    let out = Command::new(GRU)
        .arg("bench")
        .args(args)
        .arg("--json")
        .output()
        .expect("run gru bench");
    assert!(
        out.status.success(),
        "gru bench {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

#[test]
fn the_agent_bench_samples_an_idle_agent_per_engine() {
    let rows = bench(&["agent", "--duration", "5s"]);
    let rows = rows.as_array().expect("rows");
    let engines: Vec<&str> = rows.iter().filter_map(|r| r["engine"].as_str()).collect();
    assert_eq!(engines, ["reference", "exec"]);
    for r in rows {
        assert!(r["sampled_secs"].as_f64() >= Some(5.0), "{r}");
        assert!(
            r["rss_mib"].as_f64() > Some(1.0),
            "a process has memory: {r}"
        );
        assert!(r["peak_rss_mib"].as_f64() >= r["rss_mib"].as_f64(), "{r}");
        assert!(
            r["cpu_percent_with_commands"].as_f64() >= r["cpu_percent"].as_f64(),
            "{r}"
        );
    }
}

#[test]
fn the_breach_bench_times_each_breach_to_the_set_desired_call() {
    let r = bench(&["breach", "--breaches", "3"]);
    let samples: Vec<f64> = r["samples_ms"]
        .as_array()
        .expect("samples")
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    assert_eq!(samples.len(), 3, "{r}");
    assert!(samples.iter().all(|s| *s > 0.0), "{r}");
    let max = samples.iter().copied().fold(0.0, f64::max);
    assert_eq!(r["max_ms"].as_f64(), Some(max), "{r}");
    assert!(r["p50_ms"].as_f64() <= r["p99_ms"].as_f64(), "{r}");
    assert_eq!(r["report_interval_ms"], 1000);
}

#[test]
fn the_rebalance_bench_times_new_minions_to_their_share_with_and_without_it() {
    // Connections never age out: only rebalancing gives the new minion its
    // share within the window.
    let r = bench(&[
        "rebalance",
        "--scale-outs",
        "1",
        "--window",
        "8s",
        "--connections",
        "4",
        "--to",
        "2",
        "--max-connection-age",
        "0s",
    ]);
    let modes = r["modes"].as_array().expect("modes");
    let mode = |name: &str| {
        modes
            .iter()
            .find(|m| m["mode"] == name)
            .unwrap_or_else(|| panic!("no {name} mode: {r}"))
    };
    let on = mode("rebalance");
    assert_eq!(on["new_minions"], 1, "{r}");
    assert_eq!(on["reached_share"], 1, "{r}");
    let t = on["time_to_share_p50_secs"].as_f64().expect("a time");
    assert!((0.0..=10.0).contains(&t), "{r}");
    assert_eq!(on["time_to_share_max_secs"].as_f64(), Some(t), "{r}");
    let off = mode("age");
    assert_eq!(off["reached_share"], 0, "nothing moves senders: {r}");
    assert!(off["time_to_share_p50_secs"].is_null(), "{r}");
    for m in modes {
        assert!(m["window_msgs_per_sec"].as_f64() > Some(0.0), "{r}");
        assert!(m["before_msgs_per_sec"].as_f64() > Some(0.0), "{r}");
        assert_eq!(m["nacked"], 0, "{r}");
    }
}

#[test]
fn the_controller_bench_ramps_both_servers_and_compares_them() {
    let r = bench(&["controller", "--minions", "20,60", "--window", "3s"]);
    let steps = r["steps"].as_array().expect("steps");
    let seen: Vec<(&str, u64)> = steps
        .iter()
        .map(|s| {
            (
                s["target"].as_str().unwrap_or("?"),
                s["minions"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("controller", 20),
            ("controller", 60),
            ("bare", 20),
            ("bare", 60)
        ],
        "{r}"
    );
    for s in steps {
        let n = s["minions"].as_f64().expect("minions");
        // Every minion reports once a second: over a 3 s window the server
        // counts about 3n reports (the window's edges cut some).
        let counted = s["reports_per_sec"].as_f64().expect("reports") * 3.0;
        assert!(counted > 1.5 * n && counted < 4.5 * n, "{s}");
        assert!(s["cpu_us_per_report"].as_f64() > Some(0.0), "{s}");
        assert!(s["rss_mib"].as_f64() > Some(1.0), "{s}");
        assert!(s["joins_per_sec"].as_f64() > Some(0.0), "{s}");
        assert_eq!(s["sessions_ended"], 0, "no Session may end: {s}");
        // Measured by the server, from the driver's stamp.
        let (p50, p99) = (s["p50_ms"].as_f64(), s["p99_ms"].as_f64());
        assert!(p50 > Some(0.0) && p50 <= p99, "{s}");
        if s["target"] == "controller" {
            assert!(s["pass_ms"].as_f64() > Some(0.0), "{s}");
        } else {
            assert!(s["pass_ms"].is_null(), "the bare server makes no pass: {s}");
        }
    }
    let ratios = r["ratios"].as_array().expect("ratios");
    assert_eq!(ratios.len(), 2, "{r}");
    assert!(
        ratios
            .iter()
            .all(|x| x["controller_over_bare"].as_f64() > Some(0.0)),
        "{r}"
    );
}
