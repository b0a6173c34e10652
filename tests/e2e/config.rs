//! `--check-config` as an operator uses it before a deploy: every file the
//! process would read, every directory it would write and every listener
//! address is checked, each problem names the file and the key, the exit
//! code is 64, and nothing starts. The shipped examples pass once the files
//! they name exist.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::harness::GRU;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn gru(args: &[&str], config: &Path) -> Output {
    Command::new(GRU)
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run gru")
}

/// A controller config in `dir` whose files all exist.
fn controller(dir: &Path, extra: &str) -> PathBuf {
    for f in [
        "controller.pem",
        "controller.key",
        "ca.pem",
        "token",
        "minion.toml",
    ] {
        std::fs::write(dir.join(f), "x").expect("write");
    }
    let file = dir.join("controller.toml");
    std::fs::write(
        &file,
        format!(
            "listen = \"127.0.0.1:7071\"\njoin_token_file = \"token\"\nstate_dir = \"state\"\n{extra}\n\
             [tls]\ncert = \"controller.pem\"\nkey = \"controller.key\"\nclient_ca = \"ca.pem\"\n\
             [[fleet]]\nname = \"local\"\nprovider = \"local\"\nmin = 1\nmax = 2\n\
             [fleet.local]\nlisten = \"127.0.0.1:2577\"\nminion_config = \"minion.toml\"\n"
        ),
    )
    .expect("write");
    file
}

#[test]
fn each_missing_controller_file_is_named_with_its_key_and_nothing_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = controller(dir.path(), "");
    let out = gru(&["controller", "--check-config"], &file);
    assert!(out.status.success(), "all present: {}", stderr(&out));

    for (name, key) in [
        ("controller.pem", "tls.cert"),
        ("controller.key", "tls.key"),
        ("ca.pem", "tls.client_ca"),
        ("token", "join_token_file"),
        ("minion.toml", "fleet[0].local.minion_config"),
    ] {
        controller(dir.path(), "");
        std::fs::remove_file(dir.path().join(name)).expect("remove");
        for args in [&["controller", "--check-config"][..], &["controller"][..]] {
            let out = gru(args, &file);
            let err = stderr(&out);
            assert_eq!(
                out.status.code(),
                Some(64),
                "{args:?} without {name}: {err}"
            );
            assert!(
                err.contains(&format!("{}: {key}: ", file.display()))
                    && err.contains(&dir.path().join(name).display().to_string()),
                "{args:?} names {key} and the missing file: {err}"
            );
        }
        // Started nothing: no store was made.
        assert!(
            !dir.path().join("state").exists(),
            "the controller made its state directory"
        );
    }
}

#[test]
fn controller_listeners_that_share_an_address_are_refused_together_with_a_bad_state_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = controller(dir.path(), "metrics_listen = \"0.0.0.0:7071\"");
    // state_dir under a file: it could never be made.
    std::fs::write(dir.path().join("state"), "not a directory").expect("write");
    let out = gru(&["controller", "--check-config"], &file);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("metrics_listen: an address of its own; 0.0.0.0:7071 is also listen's"),
        "{err}"
    );
    assert!(err.contains("state_dir: a directory; "), "{err}");
    assert!(err.contains("2 problems"), "{err}");
}

#[test]
fn each_missing_minion_file_and_a_clashing_metrics_listener_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |extra: &str| {
        for f in ["ca.pem", "token"] {
            std::fs::write(dir.path().join(f), "x").expect("write");
        }
        let file = dir.path().join("minion.toml");
        std::fs::write(
            &file,
            format!(
                "controller = \"https://127.0.0.1:7071\"\nca_file = \"ca.pem\"\nfleet = \"local\"\n\
                 join_token_file = \"token\"\n{extra}\n[engine]\nlisten = \"0.0.0.0:2580\"\n\
                 downstream = \"127.0.0.1:2576\"\n"
            ),
        )
        .expect("write");
        file
    };
    let file = write("");
    let out = gru(&["minion", "--check-config"], &file);
    assert!(out.status.success(), "all present: {}", stderr(&out));

    write("");
    std::fs::remove_file(dir.path().join("ca.pem")).expect("remove");
    let out = gru(&["minion", "--check-config"], &file);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(64), "without the CA: {err}");
    assert!(
        err.contains(&format!("{}: ca_file: ", file.display())),
        "{err}"
    );

    // A join token may be provisioned after boot (EC2): a note, and the
    // check passes.
    write("");
    std::fs::remove_file(dir.path().join("token")).expect("remove");
    let out = gru(&["minion", "--check-config"], &file);
    let err = stderr(&out);
    assert!(out.status.success(), "without the token: {err}");
    assert!(
        err.contains(&format!("note: {}: join_token_file: ", file.display()))
            && err.contains("cannot join until it is there"),
        "{err}"
    );

    let file = write("metrics_listen = \"127.0.0.1:2580\"");
    let out = gru(&["minion", "--check-config"], &file);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains(
            "metrics_listen: an address of its own; 127.0.0.1:2580 is also engine.listen's"
        ),
        "{err}"
    );
}

/// The examples in deploy/, with their absolute paths moved under a
/// temporary root where the files they name exist, as on a host set up by
/// the README.
#[test]
fn the_shipped_example_configs_are_valid() {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy");
    let root = tempfile::tempdir().expect("tempdir");
    let at = |p: &str| format!("{}{p}", root.path().display());
    std::fs::create_dir_all(at("/etc/gru")).expect("mkdir");
    for f in ["join-token", "controller.pem", "controller.key", "ca.pem"] {
        std::fs::write(at(&format!("/etc/gru/{f}")), "x").expect("write");
    }
    let configs = root.path().join("deploy");
    std::fs::create_dir_all(&configs).expect("mkdir");
    for entry in std::fs::read_dir(&deploy).expect("deploy/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).expect("read");
            let moved = ["/etc/gru", "/var/lib/gru", "/var/log/gru"]
                .iter()
                .fold(text, |t, p| {
                    t.replace(&format!("\"{p}"), &format!("\"{}", at(p)))
                });
            std::fs::write(configs.join(path.file_name().expect("name")), moved).expect("write");
        }
    }
    for (cmd, file) in [
        ("controller", "controller.example.toml"),
        ("controller", "controller.aws.example.toml"),
        ("controller", "schedules.example.toml"),
        ("minion", "minion.example.toml"),
        ("minion", "minion.t2.example.toml"),
        ("minion", "minion.t4.example.toml"),
    ] {
        let out = gru(&[cmd, "--check-config"], &configs.join(file));
        assert!(out.status.success(), "{file}: {}", stderr(&out));
    }
}
