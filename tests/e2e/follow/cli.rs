//! The `gru` CLI with several controllers: a call a standby answers is made
//! again at the leader (only one the CLI was given), an address that is
//! down is passed over, and `gru controller status` asks every controller.

use std::path::Path;
use std::process::Output;

use serde_json::Value;

use super::{DEADLINE, Leader, Site, Standby, dead_address};

const GRU: &str = env!("CARGO_BIN_EXE_gru");

/// Runs `gru ARGS --config CLIENT` (without blocking the controllers this
/// test runs on its own thread).
async fn gru(client: &Path, args: &[&str]) -> Output {
    let run = tokio::process::Command::new(GRU)
        .args(args)
        .arg("--config")
        .arg(client)
        // Tables unwrapped: one row per line.
        .env("COLUMNS", "1000")
        .env_remove("GRU_CONFIG")
        .stdin(std::process::Stdio::null())
        .output();
    tokio::time::timeout(DEADLINE, run)
        .await
        .expect("gru finishes in time")
        .expect("run gru")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn fleet_names(o: &Output) -> Vec<String> {
    assert!(o.status.success(), "gru failed: {}", stderr(o));
    let fleets: Value = serde_json::from_slice(&o.stdout).expect("JSON");
    fleets
        .as_array()
        .expect("a list")
        .iter()
        .map(|f| f["name"].as_str().expect("name").to_owned())
        .collect()
}

#[tokio::test]
async fn the_cli_follows_a_standby_to_the_leader() {
    let site = Site::make();
    let leader = Leader::start(site.config.clone(), &[]);
    let standby = Standby::start(&site.config, &leader.address).await;

    let client = site.client_config("client.toml", &[&standby.address, &leader.address]);
    let out = gru(&client, &["fleet", "ls", "--json"]).await;
    assert_eq!(fleet_names(&out), vec![super::FLEET]);

    // The flag instead of the config's addresses: repeated, or with commas.
    let dead = site.client_config("dead.toml", &[&dead_address()]);
    let out = gru(
        &dead,
        &[
            "fleet",
            "ls",
            "--json",
            "--controller",
            &standby.address,
            "--controller",
            &leader.address,
        ],
    )
    .await;
    assert_eq!(fleet_names(&out), vec![super::FLEET]);
    let both = format!("{},{}", standby.address, leader.address);
    let out = gru(&dead, &["fleet", "ls", "--json", "--controller", &both]).await;
    assert_eq!(fleet_names(&out), vec![super::FLEET]);

    // Down first, then the leader.
    let client = site.client_config("down-first.toml", &[&dead_address(), &leader.address]);
    let out = gru(&client, &["fleet", "ls", "--json"]).await;
    assert_eq!(fleet_names(&out), vec![super::FLEET]);
}

#[tokio::test]
async fn the_cli_follows_no_leader_it_was_not_given_and_says_what_each_answered() {
    let site = Site::make();
    let leader = Leader::start(site.config.clone(), &[]);
    let standby = Standby::start(&site.config, &leader.address).await;

    let client = site.client_config("standby-only.toml", &[&standby.address]);
    let out = gru(&client, &["fleet", "ls"]).await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "the controller at {} is unavailable: controller standby-1 is a standby; the leader is leader-1 at {}",
            standby.address, leader.address
        )) && err.contains(&format!(
            "the CLI does not follow it: {} is not one of the configured controllers",
            leader.address
        )),
        "{err}"
    );

    let (a, b) = (dead_address(), dead_address());
    let client = site.client_config("all-down.toml", &[&a, &b]);
    let out = gru(&client, &["fleet", "ls"]).await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("no controller answered; tried 2:")
            && err.contains(&format!(
                "cannot reach the controller at {a}: connection refused"
            ))
            && err.contains(&format!(
                "cannot reach the controller at {b}: connection refused"
            )),
        "{err}"
    );
}

#[tokio::test]
async fn controller_status_asks_every_controller() {
    let site = Site::make();
    let leader = Leader::start(site.config.clone(), &[]);
    let standby = Standby::start(&site.config, &leader.address).await;
    let client = site.client_config("client.toml", &[&leader.address, &standby.address]);

    let out = gru(&client, &["controller", "status"]).await;
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    let row = |address: &str| {
        text.lines()
            .find(|l| l.contains(&format!(" {address} ")))
            .unwrap_or_else(|| panic!("no row for {address}: {text}"))
            .to_owned()
    };
    let leading = row(&leader.address);
    assert!(
        leading.contains(" leader ") && leading.contains("(itself)") && leading.contains("sqlite:"),
        "{leading}"
    );
    let waiting = row(&standby.address);
    for part in [
        " standby-1 ",
        " standby ",
        " leader-1 ",
        &format!(" {} ", leader.address),
        " 42 ",
        " 15s ",
        " dynamodb:gru-test ",
        " ago)",
    ] {
        assert!(waiting.contains(part), "{part:?} not in {waiting}");
    }

    let out = gru(&client, &["controller", "status", "--json"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let rows: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let rows = rows.as_array().expect("rows");
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0]["address"], leader.address.as_str());
    assert_eq!(rows[0]["role"], "leader");
    assert_eq!(rows[0]["leading"], true);
    assert_eq!(rows[1]["address"], standby.address.as_str());
    assert_eq!(rows[1]["role"], "standby");
    assert_eq!(rows[1]["leader_address"], leader.address.as_str());
    assert_eq!(rows[1]["lease_version"], 42);

    // No leader among those asked: a row for each, and exit 1.
    let dead = dead_address();
    let client = site.client_config("no-leader.toml", &[&standby.address, &dead]);
    let out = gru(&client, &["controller", "status", "--json"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let rows: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(rows[0]["role"], "standby");
    assert_eq!(rows[1]["role"], "unreachable");
    assert!(
        rows[1]["error"]
            .as_str()
            .is_some_and(|e| e.contains("connection refused")),
        "{rows:?}"
    );
    let err = stderr(&out);
    assert!(
        err.contains("no controller says it leads (2 asked, 1 unreachable)"),
        "{err}"
    );
}
