//! `gru bench agent` and `gru bench breach` run end to end and report what
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
