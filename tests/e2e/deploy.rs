//! Deployment artefacts, checked by the tools that will consume them:
//! `gru cloud-init render` against golden outputs and cloud-init's own
//! schema checker and user-data parser; the systemd units with
//! `systemd-analyze verify` and `security`, and their `Type=notify` with a
//! real `gru controller` and `gru minion` notifying a socket as systemd's;
//! the CloudFormation template with cfn-lint; the Prometheus rules, their
//! unit tests and the scrape example with promtool, and the Grafana
//! dashboard's queries against docs/metrics.md. A missing tool fails the
//! test with how to install it.
//!
//! Golden files live in tests/e2e/golden/cloud-init/. After an intended
//! change, rewrite them (and the user-data block in
//! deploy/cloudformation/gru.yaml) with
//! `GRU_UPDATE_GOLDEN=1 cargo test -p gru --test e2e deploy` and review the diff.

use std::collections::BTreeSet;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{Dev, GRU, Proc};

const SHA: &str = "5f2b0a9d1c3e4f60718293a4b5c6d7e8f9012345678901234567890abcdef012";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn golden_dir() -> PathBuf {
    root().join("tests/e2e/golden/cloud-init")
}

fn updating() -> bool {
    std::env::var_os("GRU_UPDATE_GOLDEN").is_some_and(|v| v == "1")
}

/// `name` on PATH, or a failure saying how to install it.
pub(crate) fn tool(name: &str, install: &str) -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{name} is needed by this test and is not installed: {install} (./scripts/test installs it)")
        })
}

fn cloud_init() -> PathBuf {
    tool(
        "cloud-init",
        "apt-get install -y --no-install-recommends cloud-init",
    )
}

/// The Python cloud-init runs on (its script's `#!` line), to use
/// cloud-init's own user-data parser.
fn cloud_init_python() -> PathBuf {
    let ci = cloud_init();
    let text = std::fs::read_to_string(&ci).expect("read the cloud-init script");
    let shebang = text.lines().next().unwrap_or_default();
    let python = shebang
        .strip_prefix("#!")
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("{} does not start with #!python", ci.display()));
    PathBuf::from(python)
}

fn cfn_lint() -> PathBuf {
    let bin = std::env::var_os("GRU_TEST_PYTHON")
        .map(PathBuf::from)
        .and_then(|p| p.parent().map(Path::to_owned))
        .unwrap_or_else(|| root().join(".venv/bin"));
    let lint = bin.join("cfn-lint");
    assert!(
        lint.is_file(),
        "cfn-lint is needed by this test and is not at {}: run ./scripts/test, which installs the pinned cfn-lint into .venv (or: .venv/bin/pip install cfn-lint==1.58.0)",
        lint.display()
    );
    lint
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn render(args: &[&str]) -> String {
    let out = run(Command::new(GRU)
        .args(["cloud-init", "render"])
        .args(args)
        .current_dir(golden_dir()));
    assert!(
        out.status.success(),
        "gru cloud-init render {} failed: {}",
        args.join(" "),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Compares with (or, with GRU_UPDATE_GOLDEN=1, rewrites) a golden file.
fn golden(name: &str, actual: &str) {
    let path = golden_dir().join(name);
    if updating() {
        std::fs::write(&path, actual).expect("write golden");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    if expected != actual {
        panic!(
            "{name} differs from its golden file:\n{}\nIf the change is intended: GRU_UPDATE_GOLDEN=1 cargo test -p gru --test e2e deploy",
            diff(&format!("golden/{name}"), &expected, "rendered", actual)
        );
    }
}

/// `diff -u` of two texts (diffutils), or both in full where it is missing.
fn diff(a_name: &str, a: &str, b_name: &str, b: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let (pa, pb) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::write(&pa, a).expect("write");
    std::fs::write(&pb, b).expect("write");
    Command::new("diff")
        .args(["-u", "--label", a_name, "--label", b_name])
        .arg(&pa)
        .arg(&pb)
        .output()
        .map(|o| text(&o.stdout))
        .unwrap_or_else(|_| format!("--- {a_name}\n{a}\n+++ {b_name}\n{b}"))
}

/// Runs user-data through cloud-init's own parser (as on a booting
/// instance): lists the parts it sees, merges the cloud-config parts, and
/// writes the merged config and every write_files entry under `out`.
const INSPECT: &str = r##"
import base64, json, os, sys, tempfile
from cloudinit import handlers, helpers, safeyaml, user_data
from cloudinit.handlers.cloud_config import CloudConfigPartHandler
src, out = sys.argv[1], sys.argv[2]
d = tempfile.mkdtemp()
paths = helpers.Paths({"cloud_dir": d, "run_dir": d})
msg = user_data.UserDataProcessor(paths).process(open(src, "rb").read())
h = CloudConfigPartHandler(paths)
h.handle_part(None, handlers.CONTENT_START, None, None, None, None)
parts = []
for p in msg.walk():
    if p.get_content_maintype() == "multipart":
        continue
    parts.append([p.get_content_type(), p.get_filename()])
    if p.get_content_type() == "text/cloud-config":
        h.handle_part(None, p.get_content_type(), p.get_filename(),
                      p.get_payload(decode=True).decode(), None, dict(p.items()))
merged = h.cloud_buf
with open(os.path.join(out, "merged.yaml"), "w") as f:
    f.write("#cloud-config\n" + safeyaml.dumps(merged))
for w in merged.get("write_files", []):
    body = w.get("content", "")
    data = base64.b64decode(body) if w.get("encoding") == "b64" else body.encode()
    dest = os.path.join(out, "root", w["path"].lstrip("/"))
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    open(dest, "wb").write(data)
json.dump({"parts": parts, "runcmd": merged.get("runcmd", []),
           "users": merged.get("users", [])}, sys.stdout)
"##;

struct Inspected {
    dir: tempfile::TempDir,
    summary: Value,
}

impl Inspected {
    fn file(&self, path: &str) -> PathBuf {
        self.dir
            .path()
            .join("root")
            .join(path.trim_start_matches('/'))
    }
    fn read(&self, path: &str) -> String {
        std::fs::read_to_string(self.file(path))
            .unwrap_or_else(|e| panic!("user-data writes no {path}: {e}"))
    }
}

fn inspect(user_data: &str) -> Inspected {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("user-data");
    std::fs::write(&src, user_data).expect("write");
    let out = run(Command::new(cloud_init_python())
        .arg("-c")
        .arg(INSPECT)
        .arg(&src)
        .arg(dir.path()));
    assert!(
        out.status.success(),
        "cloud-init's parser refused the user-data: {}",
        text(&out.stderr)
    );
    let summary = serde_json::from_slice(&out.stdout).expect("inspect JSON");
    Inspected { dir, summary }
}

fn schema_check(path: &Path) -> Output {
    run(Command::new(cloud_init())
        .args(["schema", "--config-file"])
        .arg(path))
}

fn assert_schema_valid(what: &str, path: &Path) {
    let out = schema_check(path);
    assert!(
        out.status.success() && text(&out.stdout).contains("Valid cloud-config"),
        "cloud-init schema rejects {what}:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// What any user-data must be (no secret, within EC2's 16 KiB, valid for
/// cloud-init's schema), and what cloud-init made of it.
fn inspect_user_data(name: &str, user_data: &str) -> Inspected {
    assert!(
        !user_data.contains("PRIVATE KEY"),
        "{name}: no secret in user-data"
    );
    assert!(
        user_data.len() <= 16 * 1024,
        "{name}: EC2 takes at most 16 KiB of user-data"
    );
    let i = inspect(user_data);
    assert_schema_valid(name, &i.dir.path().join("merged.yaml"));
    i
}

/// What every rendered variant must do, checked on what cloud-init made of it.
fn check_minion_user_data(name: &str, user_data: &str, ca: bool) {
    let i = inspect_user_data(name, user_data);

    let runcmd = i.summary["runcmd"].as_array().expect("runcmd");
    assert_eq!(
        runcmd.last().expect("a runcmd"),
        &serde_json::json!(["/usr/local/lib/gru/bootstrap"]),
        "{name}: gru's bootstrap runs last"
    );
    let users = i.summary["users"].to_string();
    assert!(
        users.contains("\"name\":\"gru\""),
        "{name}: creates the gru user: {users}"
    );

    // The files cloud-init writes work with the tools that use them. The
    // bootstrap checks the config once the CA is in place (written by
    // cloud-init or baked into the image) and before the join token may
    // be: check it the same way, its /etc/gru paths moved to a directory
    // standing for the host's.
    let host = tempfile::tempdir().expect("tempdir");
    let ca_pem = std::fs::read(i.file("/etc/gru/ca.pem"))
        .unwrap_or_else(|_| b"baked into the image".to_vec());
    std::fs::write(host.path().join("ca.pem"), ca_pem).expect("write ca.pem");
    let moved = i
        .read("/etc/gru/minion.toml")
        .replace("\"/etc/gru/", &format!("\"{}/", host.path().display()));
    let minion_toml = host.path().join("minion.toml");
    std::fs::write(&minion_toml, moved).expect("write");
    let out = run(Command::new(GRU)
        .args(["minion", "--check-config", "--config"])
        .arg(&minion_toml));
    assert!(
        out.status.success(),
        "{name}: minion.toml: {}",
        text(&out.stderr)
    );
    let toml = i.read("/etc/gru/minion.toml");
    assert!(
        toml.contains(
            "# identity: without join_token_file, the instance's signed identity document"
        )
    );
    assert!(
        toml.contains("state_dir = \"/var/lib/gru/minion\""),
        "{name}: the agent keeps its key and certificate across restarts"
    );
    // Without --join-token-*, the minion joins with its identity document:
    // no token in its config, nothing fetched at boot.
    let by_token =
        !user_data.contains("JOIN_TOKEN_FILE=''") || toml.contains("\njoin_token_file =");
    assert_eq!(
        by_token,
        matches!(name, "s3.yaml" | "quoted values"),
        "{name}: only the variants rendered with --join-token-* join with a token"
    );
    assert!(
        toml.contains("\n[aws]\nimds = true"),
        "{name}: the instance id and the warm-pool state come from IMDSv2"
    );
    assert!(
        !i.file("/etc/gru/minion.env").exists() && !user_data.contains("minion.env"),
        "{name}: no instance-id environment file"
    );
    let bootstrap = i.file("/usr/local/lib/gru/bootstrap");
    let out = run(Command::new("sh").arg("-n").arg(&bootstrap));
    assert!(
        out.status.success(),
        "{name}: the bootstrap is not valid sh: {}",
        text(&out.stderr)
    );
    assert_eq!(
        i.read("/etc/systemd/system/gru-minion.service").trim_end(),
        std::fs::read_to_string(root().join("deploy/systemd/gru-minion.service"))
            .expect("unit")
            .trim_end(),
        "{name}: installs deploy/systemd/gru-minion.service as it is"
    );
    if ca {
        assert_eq!(
            i.read("/etc/gru/ca.pem"),
            std::fs::read_to_string(golden_dir().join("ca.pem")).expect("ca")
        );
    } else {
        assert!(!i.file("/etc/gru/ca.pem").exists());
    }
}

#[test]
fn cloud_init_user_data_variants() {
    let https = render(&[
        "--fleet",
        "hl7",
        "--controller",
        "10.0.0.10:7070",
        "--server-name",
        "gru-controller",
        "--binary-url",
        "https://releases.example.org/gru/0.1.0/gru-x86_64-linux",
        "--binary-sha256",
        SHA,
        "--ca-file",
        "ca.pem",
        "--downstream",
        "10.0.2.5:2576",
    ]);
    golden("https.yaml", &https);
    check_minion_user_data("https.yaml", &https, true);
    assert!(https.contains(&format!("BINARY_SHA256='{SHA}'")));

    let s3 = render(&[
        "--fleet",
        "adt",
        "--controller",
        "https://gru-controller.internal",
        "--binary-url",
        "s3://example-gru-artifacts/gru/0.1.0/gru",
        "--binary-sha256",
        &SHA.to_uppercase(),
        "--ca-file",
        "ca.pem",
        "--engine-port",
        "6661",
        "--downstream",
        "10.0.2.5:6662",
        "--max-connection-age",
        "10m",
        "--join-token-ssm-parameter",
        "/gru/join-token",
    ]);
    golden("s3.yaml", &s3);
    check_minion_user_data("s3.yaml", &s3, true);

    let baked = render(&[
        "--fleet",
        "cert",
        "--controller",
        "10.0.0.10",
        "--package",
        "/opt/gru/bin/gru",
        "--downstream",
        "10.0.2.5:2576",
    ]);
    golden("baked.yaml", &baked);
    check_minion_user_data("baked.yaml", &baked, false);

    let multipart = render(&[
        "--fleet",
        "hl7",
        "--controller",
        "10.0.0.10",
        "--package",
        "/usr/local/bin/gru",
        "--ca-file",
        "ca.pem",
        "--downstream",
        "10.0.2.5:2576",
        "--part",
        "parts/install-engine.sh",
        "--part",
        "parts/operator.yaml",
    ]);
    golden("multipart.txt", &multipart);
    check_minion_user_data("multipart.txt", &multipart, true);
    let i = inspect(&multipart);
    assert_eq!(
        i.summary["parts"],
        serde_json::json!([
            ["text/x-shellscript", "part-001-install-engine.sh"],
            ["text/cloud-config", "part-002-operator.yaml"],
            ["text/cloud-config", "gru-minion.yaml"],
        ]),
        "the operator's parts first, gru's last"
    );
    // gru's part adds to the operator's config and replaces none of it.
    assert_eq!(
        i.summary["runcmd"],
        serde_json::json!([
            ["mkdir", "-p", "/var/lib/engine"],
            ["/usr/local/lib/gru/bootstrap"]
        ])
    );
    assert_eq!(
        i.read("/etc/engine/engine.conf"),
        "queue_dir = /var/lib/engine\n"
    );
    // Shell parts run (from cloud-init's scripts directory, sorted) before
    // the runcmd script that starts the agent.
    assert!("part-001-install-engine.sh" < "runcmd");

    // The checker is not a rubber stamp.
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "#cloud-config\nruncmd: 5\nusers: nobody\n").expect("write");
    assert!(
        !schema_check(&bad).status.success(),
        "cloud-init schema accepted a broken config"
    );
}

/// Values the CLI takes that TOML must escape come back from minion.toml
/// as given, after cloud-init's own parser wrote the file.
#[test]
fn cloud_init_minion_toml_keeps_quotes_and_backslashes() {
    let server_name = r#"gru\ctl"1'"#;
    let token = r#"/etc/gru/the "join" token\x"#;
    let user_data = render(&[
        "--fleet",
        "hl7",
        "--controller",
        "10.0.0.10",
        "--server-name",
        server_name,
        "--package",
        "/usr/local/bin/gru",
        "--downstream",
        "10.0.2.5:2576",
        "--join-token-file",
        token,
    ]);
    check_minion_user_data("quoted values", &user_data, false);
    let written: toml::Table =
        toml::from_str(&inspect(&user_data).read("/etc/gru/minion.toml")).expect("minion.toml");
    assert_eq!(written["server_name"].as_str(), Some(server_name));
    assert_eq!(written["join_token_file"].as_str(), Some(token));
}

#[test]
fn cloud_init_render_refuses_what_would_not_work() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("key.pem");
    std::fs::write(
        &key,
        "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----\n",
    )
    .expect("write");
    let unknown = dir.path().join("notes.txt");
    std::fs::write(&unknown, "hello\n").expect("write");
    let base = [
        "--fleet",
        "hl7",
        "--controller",
        "10.0.0.10",
        "--package",
        "/usr/local/bin/gru",
        "--downstream",
        "10.0.2.5:2576",
    ];
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--controller".into(), "http://10.0.0.10:7070".into()],
            "--controller: gRPC is always TLS",
        ),
        (
            vec!["--downstream".into(), "sink.internal:2576".into()],
            "--downstream: an address like",
        ),
        (
            vec!["--fleet".into(), "hl7\"; rm -rf /".into()],
            "--fleet: letters, digits",
        ),
        (
            vec!["--ca-file".into(), key.display().to_string()],
            "holds a private key; user-data must hold no secret",
        ),
        (
            vec!["--part".into(), unknown.display().to_string()],
            "cannot tell what kind of user-data",
        ),
    ];
    for (extra, expected) in cases {
        let mut args: Vec<String> = base.iter().map(|s| (*s).to_owned()).collect();
        for pair in extra.chunks(2) {
            match args.iter().position(|a| *a == pair[0]) {
                Some(i) => args[i + 1] = pair[1].clone(),
                None => args.extend(pair.iter().cloned()),
            }
        }
        let out = run(Command::new(GRU).args(["cloud-init", "render"]).args(&args));
        assert!(!out.status.success(), "accepted {args:?}");
        assert!(
            text(&out.stderr).contains(expected),
            "{args:?}: expected {expected:?} in: {}",
            text(&out.stderr)
        );
    }
    // A download needs its checksum; credentials in the URL are refused.
    let out = run(Command::new(GRU).args([
        "cloud-init",
        "render",
        "--fleet",
        "hl7",
        "--controller",
        "10.0.0.10",
        "--downstream",
        "10.0.2.5:2576",
        "--binary-url",
        "https://example.org/gru",
    ]));
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--binary-sha256"));
    let out = run(Command::new(GRU).args([
        "cloud-init",
        "render",
        "--fleet",
        "hl7",
        "--controller",
        "10.0.0.10",
        "--downstream",
        "10.0.2.5:2576",
        "--binary-sha256",
        SHA,
        "--binary-url",
        "https://b.s3.amazonaws.com/gru?X-Amz-Signature=abc",
    ]));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("carries credentials"),
        "{}",
        text(&out.stderr)
    );
}

/// Copies of the units whose commands point at the gru built for this test
/// (`systemd-analyze verify` insists that ExecStart exists).
fn units_for_this_build(dir: &Path) -> Vec<PathBuf> {
    ["gru-controller.service", "gru-minion.service"]
        .iter()
        .map(|name| {
            let unit = std::fs::read_to_string(root().join("deploy/systemd").join(name))
                .expect("read unit");
            assert!(unit.contains("/usr/local/bin/gru "));
            let path = dir.join(name);
            std::fs::write(
                &path,
                unit.replace("/usr/local/bin/gru ", &format!("{GRU} ")),
            )
            .expect("write unit");
            path
        })
        .collect()
}

fn unit_value<'a>(unit: &'a str, key: &str) -> &'a str {
    unit.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("the unit sets no {key}"))
}

#[test]
fn systemd_units_verify() {
    let analyze = tool(
        "systemd-analyze",
        "apt-get install -y systemd (systemd-analyze is part of it)",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let units = units_for_this_build(dir.path());
    let out = run(Command::new(&analyze)
        .args(["verify", "--man=no"])
        .args(&units));
    // verify exits 0 on unknown keys and bad values and only warns: any
    // word about our units is a failure.
    let stderr = text(&out.stderr);
    let about_ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("gru-controller") || l.contains("gru-minion"))
        .collect();
    assert!(
        out.status.success() && about_ours.is_empty(),
        "systemd-analyze verify:\n{stderr}"
    );
    for unit in &units {
        let out = run(Command::new(&analyze)
            // The threshold is in tenths: 20 = "2.0 OK" on systemd's scale.
            .args(["security", "--offline=yes", "--threshold=20"])
            .arg(unit));
        assert!(
            out.status.success(),
            "{} is exposed more than 2.0:\n{}",
            unit.display(),
            text(&out.stdout)
        );
    }

    let controller =
        std::fs::read_to_string(root().join("deploy/systemd/gru-controller.service")).unwrap();
    let minion = std::fs::read_to_string(root().join("deploy/systemd/gru-minion.service")).unwrap();
    for unit in [&controller, &minion] {
        for key in [
            "User",
            "NoNewPrivileges",
            "ProtectSystem",
            "PrivateTmp",
            "StateDirectory",
        ] {
            unit_value(unit, key);
        }
        assert_eq!(unit_value(unit, "ProtectSystem"), "strict");
        assert_eq!(unit_value(unit, "RestartPreventExitStatus"), "64");
    }
    let nofile: u64 = unit_value(&controller, "LimitNOFILE").parse().unwrap();
    assert!(
        nofile >= 100_000,
        "the controller holds a connection per minion"
    );
    // The minion's stop timeout leaves the engine its stop_grace (as
    // rendered into minion.toml) plus a margin.
    let stop = humantime::parse_duration(unit_value(&minion, "TimeoutStopSec")).unwrap();
    let grace = render(&[
        "--fleet",
        "f",
        "--controller",
        "10.0.0.1",
        "--package",
        "/usr/local/bin/gru",
        "--downstream",
        "10.0.0.2:1",
    ])
    .lines()
    .find_map(|l| {
        l.trim()
            .strip_prefix("stop_grace = \"")?
            .strip_suffix('"')
            .map(str::to_owned)
    })
    .expect("stop_grace in the rendered config");
    let grace = humantime::parse_duration(&grace).unwrap();
    assert!(
        stop >= grace + std::time::Duration::from_secs(15),
        "TimeoutStopSec {stop:?} vs stop_grace {grace:?}"
    );
}

/// The next datagram on the notification socket, or a failure showing the
/// service's log.
fn notification(sock: &UnixDatagram, what: &str, log: &Path) -> String {
    let mut buf = [0u8; 512];
    match sock.recv(&mut buf) {
        Ok(n) => text(&buf[..n]),
        Err(e) => panic!(
            "no notification from {what} ({e}):\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        ),
    }
}

/// Starts `gru ARGS` with `$NOTIFY_SOCKET` set as systemd would for a
/// `Type=notify` unit.
fn notifying(what: &str, args: &[&str], config: &Path, socket: &Path, log: &Path) -> Proc {
    Proc::spawn(
        what,
        Command::new(GRU)
            .args(args)
            .arg(config)
            .env("NOTIFY_SOCKET", socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("log file")),
    )
}

#[test]
fn services_tell_systemd_when_they_are_ready_and_when_they_stop() {
    for unit in ["gru-controller.service", "gru-minion.service"] {
        let text = std::fs::read_to_string(root().join("deploy/systemd").join(unit)).unwrap();
        assert_eq!(unit_value(&text, "Type"), "notify", "{unit}");
    }
    // gru dev writes a CA, certificates and both configs; with --min 0 it
    // starts no minion. Keep the files, stop it.
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = Dev::start(&["--min", "0", "--max", "1"]);
    for f in [
        "ca.pem",
        "controller.pem",
        "controller.key",
        "join-token",
        "controller.toml",
        "minion.toml",
    ] {
        std::fs::copy(dev.state_dir().join(f), dir.path().join(f)).expect("copy");
    }
    std::fs::create_dir(dir.path().join("minions")).expect("log dir");
    let old = dev.controller.trim_start_matches("https://").to_owned();
    dev.stop();
    let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = free.local_addr().expect("addr");
    drop(free);
    for f in ["controller.toml", "minion.toml"] {
        let path = dir.path().join(f);
        let config = std::fs::read_to_string(&path).expect("read");
        assert!(config.contains(&old), "{f} names {old}");
        std::fs::write(&path, config.replace(&old, &addr.to_string())).expect("write");
    }

    let socket = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&socket).expect("bind the notification socket");
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");

    let log = dir.path().join("controller.log");
    let mut controller = notifying(
        "gru controller",
        &["controller", "--config"],
        &dir.path().join("controller.toml"),
        &socket,
        &log,
    );
    assert_eq!(notification(&sock, "gru controller", &log), "READY=1\n");
    std::net::TcpStream::connect(addr).expect("ready means the gRPC port takes connections");
    // `systemctl reload` (ExecReload): SIGHUP reads the TLS files again and
    // does not stop the controller. (A SIGHUP before the controller watches
    // its files cannot stop it either; with nothing to reload yet, it is
    // not logged, so wait for the watch.)
    let start = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("TLS files watched")
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the controller does not watch its TLS files:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let hup = Command::new("kill")
        .args(["-HUP", &controller.pid().to_string()])
        .status()
        .expect("kill -HUP");
    assert!(hup.success());
    let start = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("reloaded (SIGHUP)")
    {
        assert!(
            controller.child.try_wait().expect("wait").is_none(),
            "gru controller exited on SIGHUP:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no reload logged after SIGHUP:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::net::TcpStream::connect(addr).expect("still serving after SIGHUP");
    let status = controller.stop(Duration::from_secs(20));
    assert!(status.success(), "gru controller exited with {status}");
    assert_eq!(notification(&sock, "gru controller", &log), "STOPPING=1\n");

    // The minion needs no controller to be ready: its engine listens and
    // the agent runs (and retries the controller, which is gone).
    let log = dir.path().join("minion.log");
    let mut minion = notifying(
        "gru minion",
        &["minion", "--instance-id", "i-notify", "--config"],
        &dir.path().join("minion.toml"),
        &socket,
        &log,
    );
    assert_eq!(notification(&sock, "gru minion", &log), "READY=1\n");
    let status = minion.stop(Duration::from_secs(20));
    assert!(status.success(), "gru minion exited with {status}");
    assert_eq!(notification(&sock, "gru minion", &log), "STOPPING=1\n");
    sock.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 512];
    assert!(sock.recv(&mut buf).is_err(), "nothing else: {}", text(&buf));
}

/// The block scalar after `marker` (a line ending in `|`), dedented.
fn block_after(yaml: &str, marker: &str) -> String {
    let mut lines = yaml.lines().skip_while(|l| !l.trim_end().ends_with(marker));
    lines.next().unwrap_or_else(|| panic!("no {marker:?}"));
    let body: Vec<&str> = lines.collect();
    let indent = body
        .iter()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .expect("block body");
    let mut out = String::new();
    for l in body {
        if l.trim().is_empty() {
            out.push('\n');
        } else if l.len() - l.trim_start().len() >= indent {
            out.push_str(&l[indent..]);
            out.push('\n');
        } else {
            break;
        }
    }
    out.trim_end_matches('\n').to_owned() + "\n"
}

/// The line of `gru cloud-init render --cloudformation` (and gru.yaml) that
/// names the controllers: a Fn::Sub variable of the minions' user-data that
/// is one controller's address or a list of two.
const STACK_CONTROLLER: &str = "controller = ${ControllerUrls}";
/// The line before the minions' user-data in gru.yaml (the string of a
/// Fn::Sub with variables).
const MINION_USER_DATA: &str = "- |";

#[test]
fn cloudformation_passes_cfn_lint_and_matches_its_sources() {
    let lint = cfn_lint();
    let template = root().join("deploy/cloudformation/gru.yaml");
    let out = run(Command::new(&lint).arg(&template));
    assert!(
        out.status.success(),
        "cfn-lint {}:\n{}{}",
        template.display(),
        text(&out.stdout),
        text(&out.stderr)
    );
    let yaml = std::fs::read_to_string(&template).expect("template");
    for needle in [
        "HttpTokens: required",
        "Encrypted: true",
        "deregistration_delay.connection_termination.enabled",
        "autoscaling:EC2_INSTANCE_LAUNCHING",
        "autoscaling:EC2_INSTANCE_TERMINATING",
    ] {
        assert!(yaml.contains(needle), "gru.yaml has no {needle:?}");
    }
    assert!(
        !yaml
            .lines()
            .any(|l| l.trim_start().starts_with("TargetGroupARNs:")),
        "the target group must not be attached to the group"
    );

    // cfn-lint is not a rubber stamp.
    let dir = tempfile::tempdir().expect("tempdir");
    let broken = dir.path().join("broken.yaml");
    std::fs::write(
        &broken,
        yaml.replacen("HttpTokens: required", "HttpTokens: sometimes", 1),
    )
    .expect("write");
    assert!(
        !run(Command::new(&lint).arg(&broken)).status.success(),
        "cfn-lint accepted HttpTokens: sometimes"
    );

    // The launch template's user-data is the rendered template, its
    // controller line naming the stack's one or two controllers.
    let rendered = render(&["--cloudformation"]);
    assert!(
        rendered.contains(STACK_CONTROLLER),
        "`gru cloud-init render --cloudformation` has no {STACK_CONTROLLER:?}"
    );
    let start = yaml.find("MinionLaunchTemplate:").expect("launch template");
    let embedded = block_after(&yaml[start..], MINION_USER_DATA);
    if embedded != rendered {
        if updating() {
            let marker = format!("{MINION_USER_DATA}\n");
            let body_at = start + yaml[start..].find(&marker).unwrap() + marker.len();
            let indent = " ".repeat(16);
            let indented: String = rendered
                .lines()
                .map(|l| {
                    if l.is_empty() {
                        "\n".to_owned()
                    } else {
                        format!("{indent}{l}\n")
                    }
                })
                .collect();
            // The block ends at the first line indented less than it.
            let mut old_len = 0;
            for line in yaml[body_at..].split_inclusive('\n') {
                if !line.trim().is_empty() && !line.starts_with(&indent) {
                    break;
                }
                old_len += line.len();
            }
            let old = &yaml[body_at..body_at + old_len];
            let blank = old.len() - old.trim_end_matches('\n').len() - 1;
            let new = format!(
                "{}{}{}{}",
                &yaml[..body_at],
                indented,
                "\n".repeat(blank),
                &yaml[body_at + old_len..]
            );
            std::fs::write(&template, new).expect("rewrite gru.yaml");
        } else {
            panic!(
                "gru.yaml's MinionLaunchTemplate user-data is not `gru cloud-init render --cloudformation`:\n{}\nGRU_UPDATE_GOLDEN=1 cargo test -p gru --test e2e deploy rewrites it",
                diff("gru.yaml", &embedded, "rendered", &rendered)
            );
        }
    }
    // The controller's unit is deploy/systemd/gru-controller.service, in
    // the one controller's user-data and in the two controllers'.
    let units: Vec<usize> = yaml
        .match_indices("path: /etc/systemd/system/gru-controller.service")
        .map(|(at, _)| at)
        .collect();
    assert_eq!(
        units.len(),
        2,
        "gru.yaml installs the controller's unit in two user-data"
    );
    for at in units {
        assert_eq!(
            block_after(&yaml[at..], "content: |"),
            std::fs::read_to_string(root().join("deploy/systemd/gru-controller.service"))
                .expect("unit"),
            "gru.yaml embeds deploy/systemd/gru-controller.service as it is"
        );
    }

    // deploy/iam/*.json grant what the template grants.
    let python = bin_python(&lint);
    let out = run(Command::new(&python)
        .arg("-c")
        .arg(
            r#"
import json, sys
from cfnlint.decode import decode
t, m = decode(sys.argv[1])
assert not m, m
out = {}
for role in ("ControllerRole", "MinionRole"):
    for p in t["Resources"][role]["Properties"]["Policies"]:
        if "PolicyDocument" not in p:
            p = p["Fn::If"][1]
        for s in p["PolicyDocument"]["Statement"]:
            a = s["Action"]
            out[s["Sid"]] = sorted([a] if isinstance(a, str) else a)
json.dump(out, sys.stdout)
"#,
        )
        .arg(&template));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let from_cfn: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let mut from_files = serde_json::Map::new();
    for f in ["gru-controller-policy.json", "gru-binary-policy.json"] {
        let doc: Value = serde_json::from_str(
            &std::fs::read_to_string(root().join("deploy/iam").join(f)).unwrap(),
        )
        .unwrap_or_else(|e| panic!("deploy/iam/{f}: {e}"));
        for s in doc["Statement"].as_array().expect("statements") {
            let mut actions: Vec<String> = match &s["Action"] {
                Value::String(a) => vec![a.clone()],
                Value::Array(a) => a.iter().map(|v| v.as_str().unwrap().to_owned()).collect(),
                _ => panic!("{f}: Action"),
            };
            actions.sort();
            from_files.insert(s["Sid"].as_str().expect("Sid").to_owned(), actions.into());
        }
    }
    assert_eq!(from_cfn, Value::Object(from_files));
}

fn bin_python(lint: &Path) -> PathBuf {
    lint.with_file_name("python")
}

// The stack's one or two controllers: gru.yaml evaluated as CloudFormation
// would for each ControllerCount, and what cloud-init makes of the result.

/// Evaluates a template as CloudFormation would for one set of parameters
/// (argv: template, then JSON with `parameters`, `refs` and `attrs`):
/// conditions, Fn::If, Fn::Sub (with variables), Fn::Base64 (left as
/// text), Ref and Fn::GetAtt (the values given in `refs` and `attrs`,
/// else `gru-<LogicalId>` and `<LogicalId>.<Attr>`), AWS::NoValue, and the
/// Rules. Prints the resources and outputs that exist, resolved, and the
/// descriptions of the assertions that fail. A Ref or GetAtt to a resource
/// that does not exist under these parameters is an error, as it is in
/// CloudFormation; so is a function it does not know.
const RESOLVE: &str = r##"
import json, re, sys
from cfnlint.decode import decode
t, m = decode(sys.argv[1])
assert not m, m
given = json.loads(sys.argv[2])
pseudo = {"AWS::Region": "eu-west-1", "AWS::AccountId": "123456789012",
          "AWS::StackName": "gru", "AWS::Partition": "aws", "AWS::URLSuffix": "amazonaws.com"}
params = {}
for name, p in t.get("Parameters", {}).items():
    v = given["parameters"].get(name, p.get("Default"))
    if v is None:
        sys.exit(f"parameter {name} has no default: give it a value")
    params[name] = v if isinstance(v, list) else str(v)
for name in given["parameters"]:
    if name not in params:
        sys.exit(f"the template has no parameter {name}")
NOVALUE = object()
conds = {}
def cond(name):
    if name not in conds:
        conds[name] = truth(t["Conditions"][name])
    return conds[name]
def truth(c):
    (fn, a), = c.items()
    if fn == "Fn::Equals":
        x, y = (value(v) for v in a)
        return str(x) == str(y)
    if fn == "Fn::Not":
        return not truth(a[0])
    if fn == "Fn::And":
        return all(truth(x) for x in a)
    if fn == "Fn::Or":
        return any(truth(x) for x in a)
    if fn == "Condition":
        return cond(a)
    sys.exit(f"unknown condition function {fn}")
def ref(n):
    if n == "AWS::NoValue":
        return NOVALUE
    if n in pseudo:
        return pseudo[n]
    if n in params:
        return params[n]
    if n not in t["Resources"]:
        sys.exit(f"Ref to {n}, which the template does not have")
    if n not in exists:
        sys.exit(f"Ref to {n}, which this stack does not have")
    return given["refs"].get(n, f"gru-{n}")
def getatt(n, a):
    if n not in exists:
        sys.exit(f"Fn::GetAtt of {n}, which this stack does not have")
    return given["attrs"].get(f"{n}.{a}", f"{n}.{a}")
def sub(a):
    s, names = (a[0], {k: value(x) for k, x in a[1].items()}) if isinstance(a, list) else (a, {})
    def one(m):
        name = m.group(1)
        if name.startswith("!"):
            return "${" + name[1:] + "}"
        if name in names:
            return str(names[name])
        if "." in name and name.split(".")[0] in t["Resources"]:
            return str(getatt(*name.split(".", 1)))
        return str(ref(name))
    return re.sub(r"\$\{([^}]+)\}", one, s)
def value(v):
    if isinstance(v, dict):
        if len(v) == 1:
            (k, a), = v.items()
            if k == "Ref":
                return ref(a)
            if k == "Fn::GetAtt":
                return getatt(*(a.split(".", 1) if isinstance(a, str) else a))
            if k == "Fn::If":
                return value(a[1] if cond(a[0]) else a[2])
            if k == "Fn::Sub":
                return sub(a)
            if k == "Fn::Base64":
                return value(a)
            if k.startswith("Fn::"):
                sys.exit(f"unknown function {k}")
        out = {}
        for k, x in v.items():
            x = value(x)
            if x is not NOVALUE:
                out[k] = x
        return out
    if isinstance(v, list):
        return [y for y in (value(x) for x in v) if y is not NOVALUE]
    return v
exists = {n for n, r in t["Resources"].items() if "Condition" not in r or cond(r["Condition"])}
failed = []
for rule in t.get("Rules", {}).values():
    if "RuleCondition" in rule and not truth(rule["RuleCondition"]):
        continue
    failed += [a["AssertDescription"] for a in rule["Assertions"] if not truth(a["Assert"])]
resources = {}
for n, r in t["Resources"].items():
    if n in exists:
        resources[n] = {k: r[k] for k in ("Type", "DeletionPolicy", "UpdateReplacePolicy") if k in r}
        resources[n]["Properties"] = value(r.get("Properties", {}))
outputs = {n: value(o["Value"]) for n, o in t.get("Outputs", {}).items()
           if "Condition" not in o or cond(o["Condition"])}
json.dump({"resources": resources, "outputs": outputs, "failed_rules": failed}, sys.stdout)
"##;

/// The private IPs the stack's controllers get, in this evaluation.
const CONTROLLER_IPS: [&str; 2] = ["10.0.1.10", "10.0.2.10"];
/// The instance ids they get (filled into their config at boot).
const CONTROLLER_IDS: [&str; 2] = ["i-0aaaaaaaaaaaaaaaa", "i-0bbbbbbbbbbbbbbbb"];
/// The name CloudFormation gives the StateTable, in this evaluation.
const STATE_TABLE: &str = "gru-StateTable-1A2B3C4D5E6F";
const SUBNETS: [&str; 2] = ["subnet-0123456789abcdef0", "subnet-0fedcba9876543210"];
/// The minion CA's certificate given to the stack (public; a stand-in).
const MINION_CA_PEM: &str =
    "-----BEGIN CERTIFICATE-----\nthe minion CA, a stand-in\n-----END CERTIFICATE-----\n";
/// What a controller does on its DynamoDB table (crates/gru-aws/src/dynamo):
/// TransactWriteItems has no IAM action of its own; IAM authorises the
/// ConditionCheck, Put, Update and Delete items in it.
const STATE_TABLE_ACTIONS: [&str; 7] = [
    "dynamodb:ConditionCheckItem",
    "dynamodb:DeleteItem",
    "dynamodb:DescribeTable",
    "dynamodb:GetItem",
    "dynamodb:PutItem",
    "dynamodb:Query",
    "dynamodb:UpdateItem",
];

/// gru.yaml's parameters for a stack with `count` controllers: the required
/// ones, and the high-availability ones with two.
fn stack_parameters(count: u8) -> serde_json::Map<String, Value> {
    use base64::Engine as _;
    let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
    let ca = std::fs::read(golden_dir().join("ca.pem")).expect("ca.pem");
    let mut p = serde_json::json!({
        "VpcId": "vpc-0123456789abcdef0",
        "ControllerSubnetId": SUBNETS[0],
        "MinionSubnetIds": SUBNETS,
        "LoadBalancerSubnetIds": SUBNETS,
        "AdminCidr": "10.9.0.0/16",
        "GruBinaryUrl": "https://releases.example.org/gru/0.1.0/gru-x86_64-linux",
        "GruBinarySha256": SHA,
        "ControllerCaCertificateBase64": b64(&ca),
        "ControllerCertificateBase64": b64(&ca),
        "Downstream": "10.0.2.5:2576",
    });
    if count == 2 {
        let more = serde_json::json!({
            "ControllerCount": "2",
            "ControllerSubnetId2": SUBNETS[1],
            "MinionCaCertificateBase64": b64(MINION_CA_PEM.as_bytes()),
        });
        p.as_object_mut()
            .unwrap()
            .extend(more.as_object().unwrap().clone());
    }
    p.as_object().unwrap().clone()
}

/// gru.yaml evaluated for `parameters` (see [`RESOLVE`]).
fn resolve_stack(parameters: &serde_json::Map<String, Value>) -> Value {
    let lint = cfn_lint();
    let input = serde_json::json!({
        "parameters": parameters,
        "refs": {
            "TargetGroup": "arn:aws:elasticloadbalancing:eu-west-1:123456789012:targetgroup/gru-hl7/0123456789abcdef",
            "StateTable": STATE_TABLE,
        },
        "attrs": {
            "Controller.PrivateIp": CONTROLLER_IPS[0],
            "Controller2.PrivateIp": CONTROLLER_IPS[1],
            "StateTable.Arn": format!("arn:aws:dynamodb:eu-west-1:123456789012:table/{STATE_TABLE}"),
        },
    });
    let out = run(Command::new(bin_python(&lint))
        .arg("-c")
        .arg(RESOLVE)
        .arg(root().join("deploy/cloudformation/gru.yaml"))
        .arg(input.to_string()));
    assert!(
        out.status.success(),
        "evaluating gru.yaml: {}",
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("resolved JSON")
}

/// The user-data (text) of a resolved instance or launch template, if any.
fn user_data(stack: &Value, resource: &str) -> Option<String> {
    let props = &stack["resources"][resource]["Properties"];
    let ud = if props["LaunchTemplateData"].is_object() {
        &props["LaunchTemplateData"]["UserData"]
    } else {
        &props["UserData"]
    };
    ud.as_str().map(str::to_owned)
}

/// What every controller user-data must do, checked on what cloud-init made
/// of it: its controller.toml and the script its runcmd runs.
fn check_controller_user_data(name: &str, user_data: &str) -> (String, String) {
    let i = inspect_user_data(name, user_data);
    assert_eq!(
        i.read("/etc/systemd/system/gru-controller.service")
            .trim_end(),
        read(&root().join("deploy/systemd/gru-controller.service")).trim_end(),
        "{name}: installs deploy/systemd/gru-controller.service as it is"
    );
    assert_eq!(
        i.read("/etc/gru/ca.pem"),
        read(&golden_dir().join("ca.pem")),
        "{name}: the controller's CA certificate"
    );
    let runcmd = i.summary["runcmd"].as_array().expect("runcmd");
    assert_eq!(runcmd.len(), 1, "{name}: one runcmd: {runcmd:?}");
    assert_eq!(runcmd[0][0], "sh", "{name}");
    let script = runcmd[0][2].as_str().expect("the runcmd script").to_owned();
    let out = run(Command::new("sh").arg("-n").arg("-c").arg(&script));
    assert!(
        out.status.success(),
        "{name}: the runcmd is not valid sh: {}",
        text(&out.stderr)
    );
    assert!(
        script.contains("--name '/gru/controller-tls-key'")
            && script.contains("gru controller --check-config --config /etc/gru/controller.toml"),
        "{name}: reads its TLS key from SSM and checks its config before it starts:\n{script}"
    );
    (i.read("/etc/gru/controller.toml"), script)
}

/// Runs the lines of a controller's runcmd that write its own instance id
/// and private IP into its config (from `id=` up to the config check) on
/// `toml`, with `cloud-init query` answering, by cloud-init's own code, from
/// the instance data of an EC2 instance with `id` and `ip`. The config as
/// they left it, or what they printed when they failed.
fn boot_fill_in(script: &str, toml: &str, id: &str, ip: &str) -> Result<String, String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("instance-data.json");
    let instance = serde_json::json!({
        "base64_encoded_keys": [],
        "ds": {"meta_data": {"instance-id": id, "local-ipv4": ip}},
        "v1": {"instance_id": id, "region": "eu-west-1"},
    });
    std::fs::write(&data, instance.to_string()).expect("write");
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).expect("mkdir");
    let wrapper = bin.join("cloud-init");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n[ \"$1\" = query ] || exit 2\nshift\nexec '{}' query --instance-data '{}' --user-data /dev/null --vendor-data /dev/null \"$@\"\n",
            cloud_init().display(),
            data.display()
        ),
    )
    .expect("write");
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let config = dir.path().join("controller.toml");
    std::fs::write(&config, toml).expect("write");
    let lines: Vec<&str> = script
        .lines()
        .map(str::trim)
        .skip_while(|l| !l.starts_with("id="))
        .take_while(|l| !l.starts_with("/usr/local/bin/gru controller --check-config"))
        .collect();
    assert!(
        lines.len() >= 3,
        "no `id=` .. config check lines in the runcmd:\n{script}"
    );
    let fill = lines
        .join("\n")
        .replace("/etc/gru/controller.toml", &config.display().to_string());
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = run(Command::new("sh").args(["-euc", &fill]).env("PATH", path));
    if !out.status.success() {
        return Err(format!(
            "{fill}\n{}{}",
            text(&out.stdout),
            text(&out.stderr)
        ));
    }
    Ok(read(&config))
}

fn controller_config(name: &str, toml: &str) -> gru_controller::ControllerConfig {
    gru_controller::ControllerConfig::parse(Path::new("/etc/gru/controller.toml"), toml)
        .unwrap_or_else(|e| panic!("{name}: controller.toml does not parse: {e}\n{toml}"))
}

/// The controller role's statements, those of every policy it has.
fn controller_statements(stack: &Value) -> Vec<Value> {
    stack["resources"]["ControllerRole"]["Properties"]["Policies"]
        .as_array()
        .expect("policies")
        .iter()
        .flat_map(|p| {
            p["PolicyDocument"]["Statement"]
                .as_array()
                .expect("statements")
                .clone()
        })
        .collect()
}

fn actions(statement: &Value) -> Vec<String> {
    match &statement["Action"] {
        Value::String(a) => vec![a.clone()],
        Value::Array(a) => a
            .iter()
            .map(|v| v.as_str().expect("action").to_owned())
            .collect(),
        other => panic!("Action {other}"),
    }
}

/// The one statement that grants DynamoDB actions, checked to grant
/// exactly [`STATE_TABLE_ACTIONS`] on `table_arn` and nothing wider;
/// `None` when no statement grants any.
/// The SSM parameters the controller's role may read.
fn secret_resources(statements: &[Value]) -> Value {
    statements
        .iter()
        .find(|s| s["Sid"] == "ReadSecrets")
        .expect("a ReadSecrets statement")["Resource"]
        .clone()
}

fn state_table_statement(what: &str, statements: &[Value], table_arn: &str) -> Option<Value> {
    for s in statements {
        for a in actions(s) {
            assert!(
                a != "*" && !(a.starts_with("dynamodb:") && a.contains('*')),
                "{what}: grants {a}"
            );
        }
    }
    let dynamo: Vec<&Value> = statements
        .iter()
        .filter(|s| actions(s).iter().any(|a| a.starts_with("dynamodb:")))
        .collect();
    let s = match dynamo.as_slice() {
        [] => return None,
        [s] => *s,
        more => panic!("{what}: {} statements grant DynamoDB actions", more.len()),
    };
    assert_eq!(s["Effect"], "Allow", "{what}");
    let mut granted = actions(s);
    granted.sort();
    assert_eq!(granted, STATE_TABLE_ACTIONS, "{what}: DynamoDB actions");
    assert_eq!(
        s["Resource"], table_arn,
        "{what}: the DynamoDB actions are on the state table only (no index, no stream, no *)"
    );
    Some(s.clone())
}

#[test]
fn cloudformation_one_controller_keeps_its_state_in_sqlite() {
    let stack = resolve_stack(&stack_parameters(1));
    assert_eq!(stack["failed_rules"], serde_json::json!([]));
    let resources = stack["resources"].as_object().expect("resources");
    for absent in ["StateTable", "Controller2"] {
        assert!(
            !resources.contains_key(absent),
            "one controller: no {absent}"
        );
    }
    assert_eq!(
        user_data(&stack, "ControllerLaunchTemplate"),
        None,
        "one controller: its launch template is as before (no user-data), so an update leaves the instance alone"
    );

    let ud = user_data(&stack, "Controller").expect("the controller's user-data");
    let (toml, script) = check_controller_user_data("one controller", &ud);
    for absent in ["[store]", "[minion_ca]", "@INSTANCE_ID@"] {
        assert!(
            !toml.contains(absent),
            "one controller: {absent} in\n{toml}"
        );
    }
    assert!(!script.contains("minion-ca"), "{script}");
    let config = controller_config("one controller", &toml);
    assert_eq!(config.store, gru_controller::config::StoreConfig::Sqlite);
    assert_eq!(
        config.minion_ca.cert,
        config.state_dir.join("minion-ca.pem"),
        "one controller makes its own minion CA"
    );

    let statements = controller_statements(&stack);
    assert_eq!(
        state_table_statement("one controller's role", &statements, ""),
        None,
        "one controller: no DynamoDB permission"
    );
    assert_eq!(
        secret_resources(&statements),
        serde_json::json!(["arn:aws:ssm:eu-west-1:123456789012:parameter/gru/controller-tls-key"])
    );
    let outputs: BTreeSet<&str> = stack["outputs"]
        .as_object()
        .expect("outputs")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        outputs,
        BTreeSet::from([
            "AutoScalingGroupName",
            "ControllerPrivateIp",
            "LoadBalancerDnsName",
            "TargetGroupArn"
        ])
    );

    // The minions name the one controller, as a single address.
    let minion = user_data(&stack, "MinionLaunchTemplate").expect("the minions' user-data");
    check_minion_user_data("gru.yaml, one controller", &minion, true);
    let written: toml::Table =
        toml::from_str(&inspect(&minion).read("/etc/gru/minion.toml")).expect("minion.toml");
    assert_eq!(
        written["controller"].as_str(),
        Some(format!("https://{}:7070", CONTROLLER_IPS[0]).as_str())
    );
}

#[test]
fn cloudformation_two_controllers_share_a_fenced_state_table() {
    let params = stack_parameters(2);
    let stack = resolve_stack(&params);
    assert_eq!(stack["failed_rules"], serde_json::json!([]));
    // Its rules refuse two controllers without what they need.
    for (key, bad, expected) in [
        ("ControllerSubnetId2", "", "needs ControllerSubnetId2"),
        ("ControllerSubnetId2", SUBNETS[0], "two subnets"),
        (
            "MinionCaCertificateBase64",
            "",
            "needs MinionCaCertificateBase64",
        ),
    ] {
        let mut p = params.clone();
        p.insert(key.to_owned(), bad.into());
        let failed = resolve_stack(&p)["failed_rules"].to_string();
        assert!(failed.contains(expected), "{key} = {bad:?}: {failed}");
    }

    // The table: the keys the store uses, encrypted, recoverable, on demand,
    // kept when the stack goes.
    let table = &stack["resources"]["StateTable"];
    assert_eq!(table["Type"], "AWS::DynamoDB::Table");
    assert_eq!(table["DeletionPolicy"], "Retain");
    assert_eq!(table["UpdateReplacePolicy"], "Retain");
    let t = &table["Properties"];
    assert_eq!(
        t["KeySchema"],
        serde_json::json!([
            {"AttributeName": gru_aws::dynamo::PK, "KeyType": "HASH"},
            {"AttributeName": gru_aws::dynamo::SK, "KeyType": "RANGE"},
        ])
    );
    assert_eq!(
        t["AttributeDefinitions"],
        serde_json::json!([
            {"AttributeName": gru_aws::dynamo::PK, "AttributeType": "S"},
            {"AttributeName": gru_aws::dynamo::SK, "AttributeType": "S"},
        ])
    );
    assert_eq!(t["BillingMode"], "PAY_PER_REQUEST");
    assert_eq!(t["SSESpecification"]["SSEEnabled"], true);
    assert_eq!(
        t["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"],
        true
    );

    // Two instances in two subnets, the same launch template, role and
    // security group; the user-data is the launch template's.
    let instance = |name: &str| &stack["resources"][name]["Properties"];
    for (name, subnet) in [("Controller", SUBNETS[0]), ("Controller2", SUBNETS[1])] {
        let i = instance(name);
        assert_eq!(i["SubnetId"], subnet, "{name}");
        assert_eq!(
            i["UserData"],
            Value::Null,
            "{name}: the launch template's user-data"
        );
        for key in [
            "LaunchTemplate",
            "IamInstanceProfile",
            "SecurityGroupIds",
            "ImageId",
        ] {
            assert_eq!(i[key], instance("Controller")[key], "{name}: {key}");
        }
    }
    let ud = user_data(&stack, "ControllerLaunchTemplate").expect("the controllers' user-data");
    let (toml, script) = check_controller_user_data("two controllers", &ud);
    assert!(
        inspect(&ud).read("/etc/gru/minion-ca.pem") == MINION_CA_PEM,
        "the shared minion CA's certificate"
    );
    for needle in [
        "--name '/gru/minion-ca-key'",
        "chmod 0640 /etc/gru/minion-ca.key",
    ] {
        assert!(
            script.contains(needle),
            "no {needle:?} in the runcmd:\n{script}"
        );
    }
    // Each controller's config, as its runcmd completes it at boot.
    assert!(
        boot_fill_in(&script, &toml, CONTROLLER_IDS[0], "").is_err(),
        "a controller that cannot learn its address does not start"
    );
    let mut advertised = Vec::new();
    for (id, ip) in CONTROLLER_IDS.iter().zip(CONTROLLER_IPS) {
        let own = boot_fill_in(&script, &toml, id, ip).unwrap_or_else(|e| panic!("{id}: {e}"));
        let config = controller_config(id, &own);
        let gru_controller::config::StoreConfig::Dynamodb(store) = &config.store else {
            panic!("{id}: store {:?}", config.store);
        };
        assert_eq!(store.table, STATE_TABLE);
        assert_eq!(store.region, "eu-west-1");
        assert_eq!(store.endpoint_url, None);
        assert_eq!(store.leader.name, *id);
        assert_eq!(store.leader.advertise, format!("https://{ip}:7070"));
        assert_eq!(store.leader.lease, gru_controller::config::DEFAULT_LEASE);
        assert_eq!(
            store.leader.heartbeat,
            gru_controller::config::DEFAULT_HEARTBEAT
        );
        assert_eq!(config.minion_ca.cert, Path::new("/etc/gru/minion-ca.pem"));
        assert_eq!(config.minion_ca.key, Path::new("/etc/gru/minion-ca.key"));
        advertised.push(store.leader.advertise.clone());
    }

    // The minions know both, at the addresses the controllers advertise.
    let minion = user_data(&stack, "MinionLaunchTemplate").expect("the minions' user-data");
    check_minion_user_data("gru.yaml, two controllers", &minion, true);
    let written: toml::Table =
        toml::from_str(&inspect(&minion).read("/etc/gru/minion.toml")).expect("minion.toml");
    assert_eq!(
        written["controller"],
        toml::Value::Array(advertised.iter().map(|a| a.as_str().into()).collect())
    );

    // The role: the table's actions on the table only, and the minion CA's key.
    let statements = controller_statements(&stack);
    state_table_statement(
        "two controllers' role",
        &statements,
        &format!("arn:aws:dynamodb:eu-west-1:123456789012:table/{STATE_TABLE}"),
    )
    .expect("a statement on the state table");
    assert_eq!(
        secret_resources(&statements),
        serde_json::json!([
            "arn:aws:ssm:eu-west-1:123456789012:parameter/gru/controller-tls-key",
            "arn:aws:ssm:eu-west-1:123456789012:parameter/gru/minion-ca-key"
        ])
    );
    assert_eq!(stack["outputs"]["Controller2PrivateIp"], CONTROLLER_IPS[1]);
    assert_eq!(stack["outputs"]["StateTableName"], STATE_TABLE);
}

/// The commented `[store]` block of deploy/controller.aws.example.toml,
/// uncommented with the `[minion_ca]` one it needs, is a config for one of
/// several controllers on a table; as shipped, the example keeps SQLite.
#[test]
fn aws_example_config_has_a_two_controller_store_block() {
    let path = root().join("deploy/controller.aws.example.toml");
    let example = read(&path);
    let config = controller_config("controller.aws.example.toml", &example);
    assert_eq!(config.store, gru_controller::config::StoreConfig::Sqlite);

    // Each block: its `# [table]` line and the commented lines after it.
    let mut lines: Vec<String> = example.lines().map(str::to_owned).collect();
    for table in ["# [minion_ca]", "# [store]"] {
        let at = lines
            .iter()
            .position(|l| l == table)
            .unwrap_or_else(|| panic!("controller.aws.example.toml has no {table:?} line"));
        for line in lines[at..].iter_mut() {
            let Some(rest) = line.strip_prefix("# ") else {
                break;
            };
            *line = rest.to_owned();
        }
    }
    let two = lines.join("\n");
    let config = controller_config("controller.aws.example.toml, [store] uncommented", &two);
    let gru_controller::config::StoreConfig::Dynamodb(store) = &config.store else {
        panic!("store {:?}", config.store);
    };
    assert_eq!(store.table, "gru-state");
    assert_eq!(store.region, "us-east-2");
    assert!(store.endpoint_url.is_some());
    assert_eq!(store.leader.name, "ctl-a");
    assert_eq!(store.leader.advertise, "https://10.0.1.5:7070");
    assert_eq!(store.leader.lease, gru_controller::config::DEFAULT_LEASE);
    assert_eq!(
        store.leader.heartbeat,
        gru_controller::config::DEFAULT_HEARTBEAT
    );
    assert!(
        example.contains(&format!("controller = [\"{}\"", store.leader.advertise)),
        "the example's minion and CLI list names the controller's advertised address"
    );
}

#[test]
fn iam_controller_policy_grants_the_state_table_and_no_more() {
    let doc: Value =
        serde_json::from_str(&read(&root().join("deploy/iam/gru-controller-policy.json")))
            .expect("deploy/iam/gru-controller-policy.json");
    let statements = doc["Statement"].as_array().expect("statements");
    let s = state_table_statement(
        "deploy/iam/gru-controller-policy.json",
        statements,
        "arn:aws:dynamodb:REGION:ACCOUNT_ID:table/gru-state",
    )
    .expect("a statement on the state table");
    assert_eq!(s["Sid"], "SharedState");
    let readme = read(&root().join("deploy/iam/README.md"));
    for a in STATE_TABLE_ACTIONS {
        let action = a.trim_start_matches("dynamodb:");
        assert!(
            readme.contains(action),
            "deploy/iam/README.md does not explain {a}"
        );
    }
}

// Prometheus and Grafana: deploy/prometheus/ and deploy/grafana/.

pub(crate) fn promtool() -> PathBuf {
    tool(
        "promtool",
        "apt-get install -y --no-install-recommends prometheus (promtool is part of it)",
    )
}

pub(crate) fn prometheus_dir() -> PathBuf {
    root().join("deploy/prometheus")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The names of the alerts in alerts.yaml, in order (its `- alert: Name` lines).
pub(crate) fn alert_names() -> Vec<String> {
    read(&prometheus_dir().join("alerts.yaml"))
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("- alert:"))
        .map(|n| n.trim().to_owned())
        .collect()
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// Every alert of alerts.yaml with its `expr`, a plain scalar or a block
/// (`expr: |`) whose lines are joined with spaces (the same PromQL).
fn alert_exprs() -> Vec<(String, String)> {
    let text = read(&prometheus_dir().join("alerts.yaml"));
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(name) = line.trim_start().strip_prefix("- alert:") else {
            continue;
        };
        let name = name.trim().to_owned();
        let at = lines[i + 1..]
            .iter()
            .take_while(|l| !l.trim_start().starts_with("- alert:"))
            .position(|l| l.trim_start().starts_with("expr:"))
            .map(|p| i + 1 + p)
            .unwrap_or_else(|| panic!("alert {name} has no expr"));
        let value = lines[at].trim_start()["expr:".len()..].trim();
        let expr = if value.starts_with('|') || value.starts_with('>') {
            lines[at + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || indent(l) > indent(lines[at]))
                .map(|l| l.trim())
                .collect::<Vec<_>>()
                .join(" ")
        } else {
            value.trim_matches(|c| c == '"' || c == '\'').to_owned()
        };
        out.push((name, expr.trim().to_owned()));
    }
    out
}

/// The metric names docs/metrics.md documents, a histogram as its
/// `_bucket`, `_sum` and `_count` series.
fn documented_metrics() -> BTreeSet<String> {
    let doc = read(&root().join("docs/metrics.md"));
    let mut names = BTreeSet::new();
    for line in doc.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // `| name | type | ...`: cells[0] is what precedes the first `|`.
        if cells.len() < 4 || !cells[0].is_empty() {
            continue;
        }
        let histogram = cells[2].starts_with("histogram");
        for name in cells[1].split('`').skip(1).step_by(2) {
            if !name.starts_with("gru_") {
                continue;
            }
            if histogram {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            } else {
                names.insert(name.to_owned());
            }
        }
    }
    names
}

/// The metric names a PromQL expression selects: identifiers outside
/// strings, label matchers (`{..}`), ranges (`[..]`) and label lists
/// (`by (..)`, `on (..)`, ...) that are neither functions, aggregations nor
/// keywords.
fn metric_names(expr: &str) -> Vec<String> {
    const LABEL_LISTS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    const NOT_METRICS: &[&str] = &[
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "atan2",
        "inf",
        "nan",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    let c: Vec<char> = expr.chars().collect();
    let skip_string = |mut i: usize| {
        let quote = c[i];
        i += 1;
        while i < c.len() && c[i] != quote {
            i += if c[i] == '\\' { 2 } else { 1 };
        }
        i + 1
    };
    // The index after the bracket that closes the one at `i`.
    let skip_group = |mut i: usize| {
        let (open, close) = (
            c[i],
            if c[i] == '{' {
                '}'
            } else if c[i] == '[' {
                ']'
            } else {
                ')'
            },
        );
        let mut depth = 0;
        while i < c.len() {
            match c[i] {
                '"' | '\'' | '`' => {
                    i = skip_string(i);
                    continue;
                }
                x if x == open => depth += 1,
                x if x == close => {
                    depth -= 1;
                    if depth == 0 {
                        return i + 1;
                    }
                }
                _ => {}
            }
            i += 1;
        }
        i
    };
    let next_non_space = |mut i: usize| {
        while i < c.len() && c[i].is_whitespace() {
            i += 1;
        }
        i
    };
    let mut names = Vec::new();
    let mut i = 0;
    while i < c.len() {
        match c[i] {
            '"' | '\'' | '`' => i = skip_string(i),
            '{' | '[' => i = skip_group(i),
            x if x.is_ascii_digit() || x == '.' => {
                while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '.' || c[i] == '_') {
                    i += 1;
                }
            }
            x if x.is_ascii_alphabetic() || x == '_' || x == ':' => {
                let start = i;
                while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '_' || c[i] == ':') {
                    i += 1;
                }
                let word: String = c[start..i].iter().collect();
                let next = next_non_space(i);
                let call = next < c.len() && c[next] == '(';
                if LABEL_LISTS.contains(&word.as_str()) {
                    if call {
                        i = skip_group(next);
                    }
                } else if !call && !NOT_METRICS.contains(&word.as_str()) {
                    names.push(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// Every query of the dashboard, as (panel title, expr), from panels inside
/// rows too.
pub(crate) fn dashboard_exprs() -> Vec<(String, String)> {
    fn walk(panels: &[Value], out: &mut Vec<(String, String)>) {
        for p in panels {
            let title = p["title"].as_str().unwrap_or_default().to_owned();
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"]
                    .as_str()
                    .unwrap_or_else(|| panic!("panel {title:?} has a target without expr"));
                out.push((title.clone(), expr.to_owned()));
            }
            walk(
                p["panels"].as_array().map(Vec::as_slice).unwrap_or(&[]),
                out,
            );
        }
    }
    let mut out = Vec::new();
    walk(dashboard()["panels"].as_array().expect("panels"), &mut out);
    out
}

fn dashboard() -> Value {
    let path = root().join("deploy/grafana/gru-dashboard.json");
    serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A dashboard query as Grafana sends it for one fleet: its variables
/// replaced (any left over is a failure).
pub(crate) fn grafana_expand(expr: &str, fleet: &str) -> String {
    let mut e = expr.to_owned();
    for (var, value) in [
        ("${fleet}", fleet),
        ("$fleet", fleet),
        ("$__rate_interval", "1m"),
        ("$__interval", "1m"),
        ("$__range", "1h"),
    ] {
        e = e.replace(var, value);
    }
    assert!(
        !e.contains('$'),
        "a Grafana variable this test does not know in {expr:?}"
    );
    e
}

/// scrape.example.yaml as the end-to-end test runs it: the controller at
/// `controller` and everything at 1 s so it sees changes within seconds.
pub(crate) fn scrape_config_for(controller: &str) -> String {
    let mut config = read(&prometheus_dir().join("scrape.example.yaml"));
    for (from, to) in [
        ("controller.internal:9464", controller),
        ("scrape_interval: 15s", "scrape_interval: 1s"),
        ("evaluation_interval: 15s", "evaluation_interval: 1s"),
        ("refresh_interval: 30s", "refresh_interval: 1s"),
    ] {
        assert!(
            config.contains(from),
            "scrape.example.yaml no longer has {from:?}: adapt scrape_config_for"
        );
        config = config.replace(from, to);
    }
    config
}

fn assert_tool_ok(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[test]
fn prometheus_alert_rules_pass_promtool_and_their_unit_tests() {
    let promtool = promtool();
    let dir = prometheus_dir();
    let out = run(Command::new(&promtool)
        .args(["check", "rules", "alerts.yaml"])
        .current_dir(&dir));
    assert_tool_ok("promtool check rules deploy/prometheus/alerts.yaml", &out);
    // promtool counts what it loaded: the `- alert:` lines this file's
    // other checks read are all of them.
    let found = format!("SUCCESS: {} rules found", alert_names().len());
    assert!(
        text(&out.stdout).contains(&found),
        "expected {found:?}:\n{}",
        text(&out.stdout)
    );
    let out = run(Command::new(&promtool)
        .args(["test", "rules", "alerts.test.yaml"])
        .current_dir(&dir));
    assert_tool_ok(
        "promtool test rules deploy/prometheus/alerts.test.yaml",
        &out,
    );

    // The unit tests are not a rubber stamp: an alert that no longer waits
    // out its `for:` fails them.
    let tmp = tempfile::tempdir().expect("tempdir");
    let rules = read(&dir.join("alerts.yaml"));
    assert!(rules.contains("for: 2m"));
    std::fs::write(
        tmp.path().join("alerts.yaml"),
        rules.replace("for: 2m", "for: 0m"),
    )
    .expect("write");
    std::fs::copy(
        dir.join("alerts.test.yaml"),
        tmp.path().join("alerts.test.yaml"),
    )
    .expect("copy");
    let out = run(Command::new(&promtool)
        .args(["test", "rules", "alerts.test.yaml"])
        .current_dir(tmp.path()));
    assert!(
        !out.status.success(),
        "promtool test rules passed with every `for: 2m` turned into 0m"
    );
}

#[test]
fn every_alert_has_a_firing_and_a_quiet_unit_test() {
    let alerts: BTreeSet<String> = alert_names().into_iter().collect();
    assert!(!alerts.is_empty(), "alerts.yaml has no `- alert:` line");
    for (name, expr) in alert_exprs() {
        assert!(!expr.is_empty(), "alert {name} has an empty expr");
    }
    let tests = read(&prometheus_dir().join("alerts.test.yaml"));
    let (mut firing, mut quiet) = (BTreeSet::new(), BTreeSet::new());
    let mut current: Option<String> = None;
    for line in tests.lines().map(str::trim) {
        if let Some(name) = line
            .strip_prefix("alertname:")
            .or_else(|| line.strip_prefix("- alertname:"))
        {
            current = Some(name.trim().to_owned());
        } else if let Some(rest) = line.strip_prefix("exp_alerts:") {
            let name = current
                .take()
                .expect("alerts.test.yaml: `alertname:` comes before `exp_alerts:`");
            if rest.trim() == "[]" {
                quiet.insert(name);
            } else {
                firing.insert(name);
            }
        }
    }
    let tested: BTreeSet<String> = firing.union(&quiet).cloned().collect();
    // promtool passes a test of an alert that does not exist with exp_alerts: [].
    let stale: Vec<&String> = tested.difference(&alerts).collect();
    assert!(
        stale.is_empty(),
        "alerts.test.yaml tests alerts that alerts.yaml does not have: {stale:?}"
    );
    let never_fires: Vec<&String> = alerts.difference(&firing).collect();
    let never_quiet: Vec<&String> = alerts.difference(&quiet).collect();
    assert!(
        never_fires.is_empty() && never_quiet.is_empty(),
        "alerts.test.yaml needs, for every alert, a case where it fires (exp_alerts with its labels \
         and annotations) and one where it stays quiet (exp_alerts: []); no firing case: \
         {never_fires:?}; no quiet case: {never_quiet:?}"
    );
}

#[test]
fn prometheus_scrape_example_passes_promtool_check_config() {
    let promtool = promtool();
    let dir = prometheus_dir();
    // In place: check config also loads rule_files (alerts.yaml, beside it).
    let out = run(Command::new(&promtool)
        .args(["check", "config", "scrape.example.yaml"])
        .current_dir(&dir));
    assert_tool_ok(
        "promtool check config deploy/prometheus/scrape.example.yaml",
        &out,
    );
    let example = read(&dir.join("scrape.example.yaml"));
    for needle in [
        "job_name: gru-controller",
        "job_name: gru-minions",
        "http_sd_configs:",
        "/sd/minions\"",
        "- alerts.yaml",
    ] {
        assert!(
            example.contains(needle),
            "scrape.example.yaml has no {needle:?}"
        );
    }

    // The commented ec2_sd_configs alternative, uncommented, is valid, and
    // filters on the tag the CloudFormation template gives the minions.
    let block: Vec<String> = example
        .lines()
        .skip_while(|l| l.trim() != "# - job_name: gru-minions")
        .take_while(|l| l.trim_start().starts_with('#'))
        .map(|l| {
            let l = l.trim_start().strip_prefix('#').unwrap_or_default();
            format!("  {}", l.strip_prefix(' ').unwrap_or(l))
        })
        .collect();
    assert!(
        block.len() > 3,
        "scrape.example.yaml has no commented `# - job_name: gru-minions` ec2_sd_configs block"
    );
    let block = block.join("\n");
    assert!(block.contains("ec2_sd_configs:"), "{block}");
    let cfn = read(&root().join("deploy/cloudformation/gru.yaml"));
    let tag = cfn
        .lines()
        .find_map(|l| l.trim().strip_prefix("- Key: gru:"))
        .map(|rest| format!("gru:{rest}"))
        .expect("gru.yaml tags the minions with a gru:… key");
    assert!(
        block.contains(&format!("[\"{tag}\"]")),
        "the ec2_sd_configs alternative does not filter on the tag key {tag:?}:\n{block}"
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let ec2 = tmp.path().join("ec2.yaml");
    std::fs::write(&ec2, format!("scrape_configs:\n{block}\n")).expect("write");
    let out = run(Command::new(&promtool).args(["check", "config"]).arg(&ec2));
    assert_tool_ok(
        "promtool check config (the ec2_sd_configs alternative)",
        &out,
    );

    // What tests/e2e/observe.rs gives a real Prometheus.
    let e2e = tmp.path().join("prometheus.yml");
    std::fs::write(&e2e, scrape_config_for("127.0.0.1:9464")).expect("write");
    std::fs::copy(dir.join("alerts.yaml"), tmp.path().join("alerts.yaml")).expect("copy");
    let out = run(Command::new(&promtool).args(["check", "config"]).arg(&e2e));
    assert_tool_ok("promtool check config (observe.rs's config)", &out);
}

#[test]
fn dashboard_and_alerts_query_only_documented_metrics() {
    let documented = documented_metrics();
    assert!(
        documented.contains("gru_fleet_desired")
            && documented.contains("gru_fleet_active_max")
            && documented.contains("gru_drain_duration_seconds_bucket")
            && documented.contains("gru_agent_reports_total")
            && !documented.contains("gru_drain_duration_seconds"),
        "reading docs/metrics.md's tables went wrong: {documented:?}"
    );
    let known = |m: &str| documented.contains(m) || m == "up" || m == "time";
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.99, sum by (fleet, le) (rate(gru_x_bucket{fleet=~"$fleet", le!="1"}[$__rate_interval]))) / on (fleet) group_left max without (a) (up offset 5m) and time() - 1e3"#
        ),
        ["gru_x_bucket", "up"],
        "the PromQL reader"
    );

    let dash = dashboard();
    assert!(
        dash["schemaVersion"].as_u64().unwrap_or(0) >= 36,
        "schemaVersion {}",
        dash["schemaVersion"]
    );
    let vars = dash["templating"]["list"].as_array().expect("templating");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("the dashboard has no ${name} variable"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    let fleet = var("fleet");
    assert_eq!(fleet["type"], "query");
    let fleet_query = fleet["query"]["query"]
        .as_str()
        .or(fleet["query"].as_str())
        .expect("the fleet variable's query");
    assert_eq!(fleet_query, "label_values(gru_fleet_desired, fleet)");

    let exprs = dashboard_exprs();
    assert!(exprs.len() > 10, "{} queries", exprs.len());
    let mut used = BTreeSet::new();
    let mut unknown = Vec::new();
    for (title, expr) in &exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "panel {title:?}: no metric in {expr:?}");
        for m in names {
            if !known(&m) {
                unknown.push(format!("panel {title:?}: {m}"));
            }
            used.insert(m);
        }
    }
    for (alert, expr) in alert_exprs() {
        for m in metric_names(&expr) {
            if !known(&m) {
                unknown.push(format!("alert {alert}: {m}"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "metrics that docs/metrics.md does not list (renamed?):\n{}",
        unknown.join("\n")
    );
    // Every documented metric is on the dashboard (a histogram by its buckets).
    let missing: Vec<&String> = documented
        .iter()
        .filter(|m| !m.ends_with("_sum") && !m.ends_with("_count") && !used.contains(*m))
        .collect();
    assert!(
        missing.is_empty(),
        "documented metrics no dashboard panel shows: {missing:?}"
    );
    for p in dash["panels"].as_array().expect("panels") {
        if p["type"] != "row" {
            assert_eq!(
                p["datasource"]["uid"], "${datasource}",
                "panel {} does not use the datasource variable",
                p["title"]
            );
        }
    }

    // Every query is PromQL that Prometheus parses: promtool checks them as
    // recording rules.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, expr)) in exprs.iter().enumerate() {
        let expr = serde_json::to_string(&grafana_expand(expr, "hl7")).expect("JSON string");
        rules.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: {expr}\n"
        ));
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("dashboard.rules.yaml");
    std::fs::write(&file, rules).expect("write");
    let out = run(Command::new(promtool()).args(["check", "rules"]).arg(&file));
    assert_tool_ok("promtool check rules (the dashboard's queries)", &out);
}
