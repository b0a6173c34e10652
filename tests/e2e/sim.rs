//! `gru sim`: generate a trace, replay it, read the figures and the files.

use std::process::Command;

use crate::harness::GRU;

/// The fleet bench/sim.sh replays.
fn shipped_config() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/sim-fleet.toml")
}

/// `gru sim generate --kind KIND --seed SEED --peak PEAK -o <dir>/KIND.csv`.
fn generate(dir: &std::path::Path, kind: &str, seed: &str, peak: &str) -> std::path::PathBuf {
    let trace = dir.join(format!("{kind}.csv"));
    let out = Command::new(GRU)
        .args([
            "sim", "generate", "--kind", kind, "--seed", seed, "--peak", peak, "-o",
        ])
        .arg(&trace)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    trace
}

/// `gru sim run --json` on `trace` with `config`: the summary.
fn sim_run(
    trace: &std::path::Path,
    config: &std::path::Path,
    out: &std::path::Path,
) -> serde_json::Value {
    let run = Command::new(GRU)
        .args(["sim", "run", "--json", "--trace"])
        .arg(trace)
        .arg("--config")
        .arg(config)
        .arg("--out")
        .arg(out)
        .output()
        .expect("run");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    serde_json::from_slice(&run.stdout).expect("JSON")
}

#[test]
fn sim_replays_a_spike_against_the_policy_and_the_baselines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let trace = generate(dir.path(), "spike", "3", "900");
    let out_dir = dir.path().join("out");
    let v = sim_run(&trace, &shipped_config(), &out_dir);
    let names: Vec<&str> = v["results"]
        .as_array()
        .expect("results")
        .iter()
        .filter_map(|r| r["scaler"].as_str())
        .collect();
    assert_eq!(names[0], "gru");
    assert!(names.iter().any(|n| n.starts_with("static peak")));
    assert!(names.iter().any(|n| n.starts_with("target tracking")));
    assert!(names.contains(&"oracle"));
    let oracle_ratio = v["gru_over_oracle_instance_hours"].as_f64().expect("ratio");
    let static_ratio = v["gru_over_static_instance_hours"].as_f64().expect("ratio");
    assert!(
        oracle_ratio >= 1.0,
        "nothing beats the oracle: {oracle_ratio}"
    );
    assert!(
        static_ratio < 1.0,
        "gru uses less than static peak: {static_ratio}"
    );
    let csv = std::fs::read_to_string(out_dir.join("timeline.csv")).expect("timeline");
    assert!(
        csv.starts_with("timestamp,arrivals_per_s,gru_desired"),
        "{}",
        &csv[..80]
    );
    assert_eq!(
        csv.lines().count(),
        1 + 6 * 60,
        "a row a minute for six hours"
    );
    let svg = std::fs::read_to_string(out_dir.join("chart.svg")).expect("chart");
    assert!(svg.starts_with("<svg") && svg.contains("gru in service"));

    let bad = dir.path().join("bad.csv");
    std::fs::write(
        &bad,
        "timestamp,arrivals_per_s\n2026-11-23T00:00:00Z,10\nyesterday,5\n",
    )
    .expect("write");
    let out = Command::new(GRU)
        .args(["sim", "run", "--trace"])
        .arg(&bad)
        .arg("--config")
        .arg(shipped_config())
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.csv:3: timestamp must be RFC 3339"),
        "{err}"
    );

    // A policy alone, whose max is below what the spike needs: every
    // scaler is held to it, and the summary says which wanted more.
    let small = dir.path().join("small.toml");
    std::fs::write(
        &small,
        "[[fleet]]\nname = \"small\"\nmin = 1\nmax = 4\ntarget_queue_per_minion = 3\n",
    )
    .expect("write");
    let run = |config: &std::path::Path| {
        Command::new(GRU)
            .args(["sim", "run", "--trace"])
            .arg(&trace)
            .arg("--config")
            .arg(config)
            .arg("--out")
            .arg(dir.path().join("out-small"))
            .output()
            .expect("run")
    };
    let v = sim_run(&trace, &small, &dir.path().join("out-small"));
    let results = v["results"].as_array().expect("results");
    let peak = results
        .iter()
        .find(|r| {
            r["scaler"]
                .as_str()
                .is_some_and(|n| n.starts_with("static"))
        })
        .expect("static peak");
    assert!(
        peak["wanted_above_max"].as_u64().is_some_and(|n| n > 4),
        "{peak}"
    );
    assert_eq!(
        results[0]["wanted_above_max"],
        serde_json::Value::Null,
        "gru keeps its own bounds"
    );
    let text = String::from_utf8_lossy(&run(&small).stdout).into_owned();
    assert!(
        text.contains("above the fleet's max of 4") && text.contains("held at 4"),
        "{text}"
    );

    std::fs::write(
        &small,
        "[[fleet]]\nname = \"small\"\nmin = 5\nmax = 4\ntarget_queue_per_minion = 3\n",
    )
    .expect("write");
    let out = run(&small);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("small.toml: fleet[0].")
            && err.contains("min (5) must not be greater than max (4)"),
        "{err}"
    );
}

#[test]
fn the_forecast_meets_a_daily_climb_that_reacting_does_not() {
    // Two weeks of working hours: every weekday the rate climbs to its peak
    // within three minutes at 07:00, faster than the 2-minute boot.
    let dir = tempfile::tempdir().expect("tempdir");
    let trace = generate(dir.path(), "shifts", "5", "800");
    // The first four days (Monday to Thursday) are enough: the forecast
    // needs one day of history, and a shorter trace keeps the test quick.
    let rows: Vec<String> = std::fs::read_to_string(&trace)
        .expect("trace")
        .lines()
        .take(1 + 4 * 24 * 60)
        .map(str::to_owned)
        .collect();
    std::fs::write(&trace, rows.join("\n") + "\n").expect("write");
    let shipped = shipped_config();
    let text = std::fs::read_to_string(&shipped).expect("config");
    assert!(
        text.contains("mode = \"on\""),
        "the shipped fleet forecasts"
    );
    let only = dir.path().join("forecast-only.toml");
    std::fs::write(
        &only,
        text.replace("mode = \"on\"", "mode = \"forecast_only\""),
    )
    .expect("write");

    let on = sim_run(&trace, &shipped, &dir.path().join("on"))["results"][0].clone();
    let off = sim_run(&trace, &only, &dir.path().join("only"))["results"][0].clone();
    let breach = |r: &serde_json::Value| r["slo_breach_minutes"].as_f64().expect("minutes");
    assert!(
        breach(&on) * 2.0 < breach(&off),
        "the forecast launches ahead of the climbs: {on} vs {off}"
    );
    let notes = |r: &serde_json::Value| r["notes"].to_string();
    assert!(
        notes(&on).contains("forecast (on) launched ahead at"),
        "{on}"
    );
    assert!(
        notes(&off).contains("forecast (forecast_only) launched ahead at 0 of"),
        "{off}"
    );
}
