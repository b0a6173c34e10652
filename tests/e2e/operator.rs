//! The operator's commands and what they say when something is wrong.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{Dev, GRU, Proc, free_port, wait_until};

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A client config in `dir` for a controller at `controller`, with a CA and
/// an admin certificate of a throwaway PKI made there.
fn client_config(dir: &Path, controller: &str) -> PathBuf {
    let client = dir.join("client.toml");
    std::fs::write(
        &client,
        format!("controller = \"{controller}\"\nca_file = \"ca.pem\"\ncert_file = \"a.pem\"\nkey_file = \"a.key\"\n"),
    )
    .expect("write");
    let pki = gru_controller::pki::DevPki::in_dir(dir);
    pki.ensure().expect("pki");
    std::fs::copy(&pki.admin_cert, dir.join("a.pem")).expect("copy");
    std::fs::copy(&pki.admin_key, dir.join("a.key")).expect("copy");
    client
}

#[test]
fn drain_pause_resume_and_events() {
    let dev = Dev::start(&["--min", "2", "--max", "3"]);
    dev.wait_in_service(2, Duration::from_secs(30));

    let out = dev.gru(&["pause", "local"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(dev.fleet()["paused"], true);
    let table = dev.gru(&["fleet", "ls"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("paused"));
    let out = dev.gru(&["resume", "local"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(dev.fleet()["paused"], false);

    // A viewer's certificate from the dev CA: it may look, not change.
    let alice = tempfile::tempdir().expect("tempdir");
    let state = dev.state_dir();
    let (ca_cert, ca_key) = (state.join("ca.pem"), state.join("ca.key"));
    let out = dev.gru(&[
        "cert",
        "issue",
        "--name",
        "alice",
        "--role",
        "viewer",
        "--out",
        alice.path().to_str().expect("utf-8"),
        "--ca-cert",
        ca_cert.to_str().expect("utf-8"),
        "--ca-key",
        ca_key.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "cert issue: {}", stderr(&out));
    let as_alice = |args: &[&str]| {
        dev.command(args)
            .env("GRU_CONFIG", alice.path().join("client.toml"))
            .output()
            .expect("run gru")
    };
    let out = as_alice(&["whoami"]);
    assert!(out.status.success(), "whoami: {}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("CN=alice: role viewer"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(as_alice(&["fleet", "ls"]).status.success());
    let out = as_alice(&["pause", "local"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("Pause needs the operator role; CN=alice has the viewer role"),
        "{}",
        stderr(&out)
    );
    assert_eq!(dev.fleet()["paused"], false);
    // The audit trail names who paused: gru dev's admin certificate.
    let events = dev.gru(&["events"]);
    assert!(
        String::from_utf8_lossy(&events.stdout).contains("(by CN=gru admin)"),
        "{}",
        String::from_utf8_lossy(&events.stdout)
    );

    let victim = dev.minions(false)[0]["id"].as_str().expect("id").to_owned();
    let out = dev.gru(&["drain", &victim, "--wait", "--timeout", "60s"]);
    assert!(
        out.status.success(),
        "drain: {}\n{}",
        stderr(&out),
        dev.log()
    );
    let m = dev.json(&["minion", "get", &victim]);
    assert_eq!(m["state"], "Gone");
    assert_eq!(m["drain_reason"], "drained by an operator");
    // The fleet's minimum brings a replacement.
    dev.wait_in_service(2, Duration::from_secs(30));

    let events = dev.gru(&["events", "--json"]);
    assert!(events.status.success());
    let gone_event = String::from_utf8_lossy(&events.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .any(|e| e["minion_id"] == victim.as_str() && e["to"] == "Gone");
    assert!(gone_event, "gru events shows the drained minion going");

    let out = dev.gru(&["scale", "local", "9"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("allows 2..=3 minions, not 9"),
        "{}",
        stderr(&out)
    );
    let out = dev.gru(&["drain", "m-nosuch"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no minion \"m-nosuch\""),
        "{}",
        stderr(&out)
    );
    // Its log went to a file: plain text, no colour codes.
    assert!(!dev.log().contains('\u{1b}'), "colour codes in a log file");
    dev.stop();
}

#[test]
fn unreachable_controller_gets_one_clear_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A port that was free a moment ago: nothing listens there.
    let port = free_port();
    let client = client_config(dir.path(), &format!("https://127.0.0.1:{port}"));
    let out = Command::new(GRU)
        .args(["fleet", "ls"])
        .env("GRU_CONFIG", &client)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("cannot reach the controller at https://127.0.0.1:"),
        "{err}"
    );
    assert!(err.contains("connection refused"), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
}

#[test]
fn a_client_certificate_from_another_ca_is_refused_clearly() {
    let dev = Dev::start(&["--min", "1", "--max", "1"]);
    let other = tempfile::tempdir().expect("tempdir");
    let foreign = gru_controller::pki::DevPki::in_dir(other.path());
    foreign.ensure().expect("pki");
    let client = other.path().join("client.toml");
    std::fs::write(
        &client,
        format!(
            "controller = \"{}\"\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            dev.controller,
            dev.state_dir().join("ca.pem").display(),
            foreign.admin_cert.display(),
            foreign.admin_key.display()
        ),
    )
    .expect("write");
    let out = Command::new(GRU)
        .args(["fleet", "ls"])
        .env("GRU_CONFIG", &client)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("refused the TLS handshake"), "{err}");
    assert!(
        err.contains("certificate is not signed by the controller's CA"),
        "{err}"
    );
    assert!(
        !err.contains("transport error") && !err.contains("operation was canceled"),
        "{err}"
    );
    // The controller is still serving its real clients.
    assert_eq!(dev.fleet()["name"], "local");
    dev.stop();
}

#[test]
fn bad_configs_name_the_file_and_key_and_exit_non_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("controller.toml");
    // Writes `text` as the controller config and runs `gru controller ARGS --config FILE`.
    let run = |text: &str, args: &[&str]| {
        std::fs::write(&file, text).expect("write");
        Command::new(GRU)
            .arg("controller")
            .args(args)
            .arg("--config")
            .arg(&file)
            .output()
            .expect("run")
    };
    let fleet = "[[fleet]]\nname = \"prod\"\nprovider = \"local\"\nmin = 4\nmax = 2\n\
                 [fleet.local]\nlisten = \"127.0.0.1:0\"\nminion_config = \"m.toml\"\n";
    let tls = "[tls]\ncert = \"c\"\nkey = \"k\"\nclient_ca = \"ca\"\n";

    let out = run(
        &format!("join_token_file = \"t\"\n{tls}{fleet}"),
        &["--check-config"],
    );
    assert_eq!(out.status.code(), Some(64));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "{}: fleet[0].max: min (4) must not be greater than max (2)",
            file.display()
        )),
        "{err}"
    );

    let out = run("listen = 7070\n", &[]);
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("listen"), "{}", stderr(&out));

    // Every problem at once, each with its key.
    let out = run(
        &format!("listen = \"nowhere\"\n{tls}{fleet}"),
        &["--check-config"],
    );
    assert_eq!(out.status.code(), Some(64));
    let err = stderr(&out);
    for key in ["listen", "join_token_file", "fleet[0].max"] {
        assert!(
            err.contains(&format!("{}: {key}: ", file.display())),
            "{key} missing in {err}"
        );
    }

    let minion = dir.path().join("minion.toml");
    std::fs::write(&minion, "controller = \"http://x:1\"\n").expect("write");
    let out = Command::new(GRU)
        .args(["minion", "--check-config", "--config"])
        .arg(&minion)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    assert!(
        stderr(&out).contains("controller: an https:// address"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn gru_dev_configs_pass_check_config() {
    let dev = Dev::start(&["--min", "1", "--max", "2"]);
    for (cmd, file) in [("controller", "controller.toml"), ("minion", "minion.toml")] {
        let out = Command::new(GRU)
            .args([cmd, "--check-config", "--config"])
            .arg(dev.state_dir().join(file))
            .output()
            .expect("run");
        assert!(out.status.success(), "{cmd}: {}", stderr(&out));
    }
    wait_until("the fleet to report", Duration::from_secs(30), || {
        (dev.fleet()["in_service"] == 1).then_some(())
    });
    dev.stop();
}

/// A store the controller cannot trust stops it before anything starts,
/// with a message naming the file and what is wrong, and the file is left
/// byte for byte as it was: garbage, and a database from a newer gru.
#[test]
fn a_corrupt_or_newer_store_stops_the_controller_and_is_left_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("controller.toml");
    std::fs::write(
        &config,
        "listen = \"127.0.0.1:0\"\njoin_token_file = \"token\"\nstate_dir = \"state\"\n\
         [tls]\ncert = \"c.pem\"\nkey = \"c.key\"\nclient_ca = \"ca.pem\"\n\
         [[fleet]]\nname = \"prod\"\nprovider = \"local\"\nmax = 2\n\
         [fleet.local]\nlisten = \"127.0.0.1:0\"\nminion_config = \"m.toml\"\n",
    )
    .expect("write config");
    // The files the config names exist (the store is opened, and refused,
    // before any of them is read).
    for f in ["token", "c.pem", "c.key", "ca.pem", "m.toml"] {
        std::fs::write(dir.path().join(f), "t").expect("write");
    }
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("state dir");
    let db = state.join("gru-controller.db");
    let start = || {
        Command::new(GRU)
            .args(["controller", "--config"])
            .arg(&config)
            .output()
            .expect("run")
    };

    std::fs::write(
        &db,
        b"not a database, and long enough to look like one".repeat(100),
    )
    .expect("garbage");
    let before = std::fs::read(&db).expect("read");
    let out = start();
    assert!(!out.status.success(), "started on a garbage store");
    let err = stderr(&out);
    assert!(
        err.contains(&db.display().to_string()) && err.contains("refusing"),
        "{err}"
    );
    assert_eq!(std::fs::read(&db).expect("read"), before, "file changed");

    // A database written by a newer gru (its schema version is ahead).
    std::fs::remove_file(&db).expect("remove");
    let python = std::env::var("GRU_TEST_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let made = Command::new(python)
        .args([
            "-c",
            "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); \
             c.execute('create table minions (id text)'); \
             c.execute('pragma user_version = 99'); c.commit(); c.close()",
        ])
        .arg(&db)
        .status()
        .expect("python3 runs");
    assert!(made.success(), "python3 made the newer database");
    let before = std::fs::read(&db).expect("read");
    let out = start();
    assert!(!out.status.success(), "started on a newer store");
    let err = stderr(&out);
    assert!(err.contains("newer gru") && err.contains("99"), "{err}");
    assert_eq!(std::fs::read(&db).expect("read"), before, "file changed");
}

/// A sender that holds idle connections open does not hold a drained
/// minion: the engine closes them, the load balancer closes the sender's
/// side too, the target shows unused and the minion is terminated long
/// before the 300 s deregistration delay.
#[test]
fn an_idle_sender_does_not_hold_a_drained_minion() {
    use std::io::Read;
    let dev = Dev::start(&["--min", "1", "--max", "1", "--deregistration-delay", "300s"]);
    dev.wait_in_service(1, Duration::from_secs(30));
    let mut idle: Vec<std::net::TcpStream> = (0..4)
        .map(|_| std::net::TcpStream::connect(dev.load_balancer).expect("connect"))
        .collect();
    let minion = wait_until(
        "the engine to hold the idle connections",
        Duration::from_secs(30),
        || {
            dev.minions(false)
                .into_iter()
                .find(|m| m["open_connections"].as_u64() == Some(4))
        },
    );
    let id = minion["id"].as_str().expect("id").to_owned();
    let out = dev.gru(&["drain", &id, "--wait", "--timeout", "30s"]);
    assert!(
        out.status.success(),
        "drain with idle senders: {}\n{}",
        stderr(&out),
        dev.log()
    );
    // Each idle sender sees its connection closed (end of stream).
    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(0) => {}
            other => panic!("expected the connection closed, got {other:?}"),
        }
    }
    dev.stop();
}

/// Usage errors of `gru scale` exit 2 with a line that says what was
/// expected, before any call: a size that is not a number, and a pin that
/// would end at once (it would scale in at once).
#[test]
fn scale_usage_errors_exit_2_before_any_call() {
    for (args, says) in [
        (
            &["scale", "local", "abc"][..],
            "a number of minions or `auto`",
        ),
        (
            &["scale", "local", "3", "--until", "2020-01-01T00:00:00Z"][..],
            "is not in the future",
        ),
        (
            &["scale", "local", "3", "--for", "0s"][..],
            "must last longer than 0s",
        ),
    ] {
        let out = Command::new(GRU)
            .args(args)
            .env("GRU_CONFIG", "/nonexistent/client.toml")
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
    }
}

/// A client config whose controller address lacks `https://` gets one line
/// that says what is expected and what was probably meant.
#[test]
fn a_controller_address_without_https_gets_a_hint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let client = dir.path().join("client.toml");
    std::fs::write(
        &client,
        "controller = \"127.0.0.1:7070\"\nca_file = \"ca.pem\"\ncert_file = \"a.pem\"\nkey_file = \"a.key\"\n",
    )
    .expect("write");
    let out = Command::new(GRU)
        .args(["fleet", "ls", "--config"])
        .arg(&client)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("expected an https:// address")
            && err.contains("did you mean \"https://127.0.0.1:7070\"")
            && err.lines().count() == 1,
        "{err}"
    );
}

/// A port that accepts TCP and never says a word (not a TLS server, or a
/// controller wedged before its handshake): `gru fleet ls --timeout 2s`
/// gives up after 2 s with one line that names the address and what it
/// waited for, instead of sitting silent for minutes.
#[test]
fn a_port_that_never_answers_times_out_saying_what_it_waited_for() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = silent.local_addr().expect("addr");
    silent.set_nonblocking(true).expect("nonblocking");
    let stop = Arc::new(AtomicBool::new(false));
    // Accepts every connection and holds it open, answering nothing.
    let holder = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut held = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match silent.accept() {
                    Ok((conn, _)) => held.push(conn),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            held.len()
        })
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let controller = format!("https://{addr}");
    let client = client_config(dir.path(), &controller);
    let started = Instant::now();
    let out = Command::new(GRU)
        .args(["fleet", "ls", "--timeout", "2s"])
        .env("GRU_CONFIG", &client)
        .stdin(Stdio::null())
        .output()
        .expect("run");
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let accepted = holder.join().expect("holder");
    assert!(accepted >= 1, "the CLI never connected");
    assert!(!out.status.success());
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(10),
        "gave up after {took:?}"
    );
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "no answer from the controller at {controller} within 2s"
        )) && err.contains("TCP connected; the TLS handshake never completed"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");
}

/// A client config whose server_name is not a name in the controller's
/// certificate is told exactly that, and which names the certificate has;
/// not that the certificate is from another CA.
#[test]
fn a_wrong_server_name_is_reported_as_the_name_not_the_ca() {
    let dev = Dev::start(&["--min", "1", "--max", "1"]);
    let original = std::fs::read_to_string(dev.state_dir().join("client.toml")).expect("read");
    let mut text: String = original
        .lines()
        .filter(|l| !l.starts_with("server_name"))
        .map(|l| format!("{l}\n"))
        .collect();
    text.push_str("server_name = \"wrong.example\"\n");
    // Beside the original, so its relative certificate paths still hold.
    let client = dev.state_dir().join("wrong-name.toml");
    std::fs::write(&client, text).expect("write");
    let out = dev
        .command(&["fleet", "ls"])
        .env("GRU_CONFIG", &client)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("certificate that is not valid for the name \"wrong.example\"")
            && err.contains(&format!("(server_name in {})", client.display()))
            && err.contains("it is valid for: localhost"),
        "{err}"
    );
    assert!(
        !err.contains("not signed by the CA"),
        "blames the CA: {err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    dev.stop();
}

/// Reads a child's output line by line onto a channel, so a test can wait
/// for a line with a deadline.
fn lines_of(out: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Every line from `rx` until one for which `f` holds (included), or a
/// panic naming `what` at the deadline.
fn lines_until(
    rx: &mpsc::Receiver<String>,
    what: &str,
    deadline: Duration,
    f: impl Fn(&str) -> bool,
) -> Vec<String> {
    let end = Instant::now() + deadline;
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                let done = f(&line);
                seen.push(line);
                if done {
                    return seen;
                }
            }
            Err(_) => panic!(
                "no line {what} within {deadline:?}; saw:\n{}",
                seen.join("\n")
            ),
        }
    }
}

/// `gru events -f` outlives a controller restart: killed, the controller
/// closes the stream, the CLI says so on stderr and reconnects, and events
/// from after the restart arrive, with none printed twice. With --no-retry
/// it exits non-zero instead, saying the controller closed the stream.
#[test]
fn events_follow_reconnects_after_a_controller_restart_printing_nothing_twice() {
    let args = ["--min", "1", "--max", "1"];
    let mut dev = Dev::start(&args);
    let follow = |extra: &[&str]| {
        let mut cmd = dev.command(&[&["events", "-f", "--json"][..], extra].concat());
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut proc = Proc::spawn("gru events -f", &mut cmd);
        let out = lines_of(proc.child.stdout.take().expect("stdout"));
        let err = lines_of(proc.child.stderr.take().expect("stderr"));
        (proc, out, err)
    };
    let (follower, out, err) = follow(&[]);
    let (mut quitter, quitter_out, quitter_err) = follow(&["--no-retry"]);
    let admin_event = |says: &'static str| {
        move |line: &str| {
            serde_json::from_str::<Value>(line).is_ok_and(|e| {
                e["kind"] == "admin" && e["message"].as_str().is_some_and(|m| m.contains(says))
            })
        }
    };
    let wait = Duration::from_secs(30);
    assert!(dev.gru(&["pause", "local"]).status.success());
    let mut printed = lines_until(&out, "saying the fleet paused", wait, admin_event("paused"));
    // Both followers are connected before the kill (on a busy machine the
    // second may not have reached the controller yet).
    lines_until(
        &quitter_out,
        "from --no-retry saying the fleet paused",
        wait,
        admin_event("paused"),
    );

    dev.kill();
    lines_until(&err, "saying the stream closed", wait, |l| {
        l.contains("closed the event stream; reconnecting in 1s")
    });
    let status = quitter.wait_exit(wait);
    assert!(!status.success(), "--no-retry exited with {status}");
    let prefix = format!(
        "error: the controller at {} closed the event stream",
        dev.controller
    );
    lines_until(&quitter_err, "from --no-retry", wait, |l| {
        l.starts_with(&prefix)
    });

    let dev = dev.restart(&args);
    assert!(dev.gru(&["resume", "local"]).status.success());
    lines_until(
        &err,
        "saying it reconnected",
        Duration::from_secs(60),
        |l| l.starts_with("reconnected to the controller"),
    );
    printed.extend(lines_until(
        &out,
        "saying the fleet resumed, after the restart",
        wait,
        admin_event("resumed"),
    ));
    let mut unique = printed.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        printed.len(),
        "events printed twice:\n{}",
        printed.join("\n")
    );
    drop(follower);
    dev.stop();
}

/// `gru fleet ls` and `gru minion ls` fit 80 columns (COLUMNS, as a
/// terminal of that width would), pinned fleet and all; `-o wide` shows
/// the columns the narrow tables leave out, on one line per row.
#[test]
fn tables_fit_80_columns_and_wide_shows_every_column() {
    let dev = Dev::start(&["--min", "1", "--max", "2"]);
    dev.wait_in_service(1, Duration::from_secs(30));
    // A pin with an end makes the longest MODE cell.
    assert!(
        dev.gru(&["scale", "local", "1", "--for", "2h"])
            .status
            .success()
    );
    let run = |args: &[&str]| {
        let out = dev
            .command(args)
            .env("COLUMNS", "80")
            .output()
            .expect("run");
        assert!(out.status.success(), "gru {args:?}: {}", stderr(&out));
        String::from_utf8(out.stdout).expect("UTF-8")
    };
    for args in [&["fleet", "ls"][..], &["minion", "ls"][..]] {
        let table = run(args);
        for line in table.lines() {
            assert!(
                line.chars().count() <= 80,
                "gru {args:?}: {} chars:\n{table}",
                line.chars().count()
            );
        }
        for left_out in ["PROVIDER", "CAPACITY", "ENGINE", "INSTANCE"] {
            assert!(!table.contains(left_out), "{left_out} in\n{table}");
        }
    }
    assert!(run(&["fleet", "ls"]).contains("pinned 1 until"));

    let fleets = run(&["fleet", "ls", "-o", "wide"]);
    for column in [
        "PROVIDER",
        "MIN",
        "MAX",
        "DESIRED",
        "CAPACITY",
        "IN FLIGHT",
        "WHY",
    ] {
        assert!(fleets.contains(column), "{column} missing in\n{fleets}");
    }
    let minions = run(&["minion", "ls", "--output", "wide"]);
    for column in [
        "INSTANCE",
        "ENGINE",
        "PROCESSED",
        "FAILED",
        "REPORTED",
        "i-local-",
    ] {
        assert!(minions.contains(column), "{column} missing in\n{minions}");
    }
    assert!(
        fleets.lines().any(|l| l.chars().count() > 80),
        "-o wide is not squeezed:\n{fleets}"
    );
    dev.stop();
}

/// `gru scale --help` says what releasing a pin does: no stabilization
/// window, the step limit and the cooldown.
#[test]
fn scale_help_says_what_releasing_a_pin_does() {
    let out = Command::new(GRU)
        .args(["scale", "--help"])
        .output()
        .expect("run");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout).replace('\n', " ");
    for says in [
        "Releasing a pin",
        "scale_in_stabilization",
        "max_step_in",
        "scale_in_cooldown",
    ] {
        assert!(help.contains(says), "{says} missing in {help}");
    }
}
