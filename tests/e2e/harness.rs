//! Runs the real `gru` binary the way a user does: `gru dev` in the
//! background, CLI commands against it, `gru bench` for load. Every wait has
//! a deadline; every process started here is stopped here.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const GRU: &str = env!("CARGO_BIN_EXE_gru");

/// Polls `f` until it returns Some, or panics naming `what` at the deadline.
pub fn wait_until<T>(what: &str, deadline: Duration, f: impl FnMut() -> Option<T>) -> T {
    wait_until_or(what, deadline, f, String::new)
}

/// [`wait_until`], with what `context` says (logs) in the panic message.
pub fn wait_until_or<T>(
    what: &str,
    deadline: Duration,
    mut f: impl FnMut() -> Option<T>,
    context: impl Fn() -> String,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            child,
            name: name.to_owned(),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn terminate(&self) {
        // kill(1) rather than libc::kill keeps the tests free of unsafe code.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status();
    }

    /// SIGTERM and wait up to `deadline` for a clean exit.
    pub fn stop(&mut self, deadline: Duration) -> std::process::ExitStatus {
        self.terminate();
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            if start.elapsed() > deadline {
                let _ = self.child.kill();
                panic!("{} did not stop within {deadline:?} of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn wait_exit(&mut self, deadline: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                start.elapsed() < deadline,
                "{} still running after {deadline:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.terminate();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(5) {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A `gru dev` running in its own state directory, on free ports.
pub struct Dev {
    pub proc: Proc,
    pub dir: tempfile::TempDir,
    pub load_balancer: SocketAddr,
    pub controller: String,
    /// The controller's metrics URL (`http://…/metrics`), when on.
    pub metrics: Option<String>,
    /// Kills the minions of this state directory if a test ends without
    /// stopping them (local minions outlive a killed `gru dev`).
    _reaper: Reaper,
}

impl Dev {
    pub fn start(args: &[&str]) -> Dev {
        let dir = tempfile::tempdir().expect("tempdir");
        Dev::launch(dir, "127.0.0.1:0", "127.0.0.1:0", args)
    }

    fn launch(dir: tempfile::TempDir, listen: &str, lb_listen: &str, args: &[&str]) -> Dev {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("dev.log"))
            .expect("log file");
        let info_path = dir.path().join("state/dev.json");
        // A killed gru dev leaves its dev.json behind.
        let _ = std::fs::remove_file(&info_path);
        let mut cmd = Command::new(GRU);
        cmd.args([
            "dev",
            "--listen",
            listen,
            "--lb-listen",
            lb_listen,
            "--state-dir",
        ])
        .arg(dir.path().join("state"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
        // Metrics on a free port unless the test chooses (tests run in
        // parallel; the default port would clash).
        if !args
            .iter()
            .any(|a| *a == "--metrics-listen" || *a == "--no-metrics")
        {
            cmd.args(["--metrics-listen", "127.0.0.1:0"]);
        }
        let mut proc = Proc::spawn("gru dev", &mut cmd);
        let info: Value = wait_until("gru dev to write dev.json", Duration::from_secs(30), || {
            if let Some(status) = proc.child.try_wait().expect("wait") {
                let log = std::fs::read_to_string(dir.path().join("dev.log")).unwrap_or_default();
                panic!("gru dev exited with {status}:\n{log}");
            }
            let text = std::fs::read_to_string(&info_path).ok()?;
            serde_json::from_str(&text).ok()
        });
        let load_balancer = info["load_balancer"]
            .as_str()
            .expect("lb")
            .parse()
            .expect("lb addr");
        let controller = info["controller"].as_str().expect("controller").to_owned();
        let metrics = info["metrics"].as_str().map(str::to_owned);
        Dev {
            metrics,
            proc,
            _reaper: Reaper {
                marker: dir.path().join("state/minion.toml"),
            },
            dir,
            load_balancer,
            controller,
        }
    }

    /// SIGKILLs `gru dev`, as a crash or the OOM killer would: it gets no
    /// chance to stop anything, and its minions live on.
    pub fn kill(&mut self) {
        self.proc.child.kill().expect("kill gru dev");
        let _ = self.proc.child.wait();
    }

    /// Starts `gru dev` again on the same state directory and ports (the
    /// minions that outlived the last one reconnect to the same address).
    pub fn restart(self, args: &[&str]) -> Dev {
        let Dev {
            proc,
            dir,
            load_balancer,
            controller,
            _reaper,
            ..
        } = self;
        drop(proc);
        std::mem::forget(_reaper);
        let listen = controller.trim_start_matches("https://").to_owned();
        Dev::launch(dir, &listen, &load_balancer.to_string(), args)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dev.log")).unwrap_or_default()
    }

    /// `gru ARGS` against this controller, for a test to add to (an
    /// environment variable, piped output) before it runs it.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(GRU);
        cmd.args(args)
            .env("GRU_CONFIG", self.state_dir().join("client.toml"))
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `gru ARGS` against this controller.
    pub fn gru(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run gru")
    }

    /// Runs `gru ARGS --json`, insists on success, and parses the output.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.gru(&all);
        assert!(
            out.status.success(),
            "gru {} failed: {}\n--- gru dev log ---\n{}",
            all.join(" "),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        serde_json::from_slice(&out.stdout).expect("JSON output")
    }

    pub fn fleet(&self) -> Value {
        let fleets = self.json(&["fleet", "ls"]);
        fleets
            .as_array()
            .and_then(|a| a.first())
            .cloned()
            .expect("one fleet")
    }

    pub fn minions(&self, all: bool) -> Vec<Value> {
        let args: &[&str] = if all {
            &["minion", "ls", "--all"]
        } else {
            &["minion", "ls"]
        };
        self.json(args).as_array().cloned().unwrap_or_default()
    }

    pub fn wait_in_service(&self, n: u64, deadline: Duration) {
        wait_until(&format!("{n} minions in service"), deadline, || {
            let f = self.fleet();
            (f["in_service"].as_u64() == Some(n) && f["draining"].as_u64().unwrap_or(0) == 0)
                .then_some(())
        });
    }

    /// Stops `gru dev` with SIGTERM and checks that no minion process of its
    /// state directory survives.
    pub fn stop(mut self) {
        let status = self.proc.stop(Duration::from_secs(20));
        assert!(
            status.success(),
            "gru dev exited with {status}\n{}",
            self.log()
        );
        let marker = self.state_dir().join("minion.toml");
        wait_until(
            "every minion process to exit",
            Duration::from_secs(10),
            || processes_mentioning(&marker).is_empty().then_some(()),
        );
    }
}

/// Kills, on drop, the processes whose command line mentions `marker`: the
/// minions of one test's state directory, which only that test started.
struct Reaper {
    marker: PathBuf,
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in processes_mentioning(&self.marker) {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
}

/// Pids of processes whose command line mentions `path`.
pub fn processes_mentioning(path: &Path) -> Vec<u32> {
    let needle = path.to_string_lossy().into_owned();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        // Zombies have an empty cmdline and are not running.
        if String::from_utf8_lossy(&cmdline)
            .replace('\0', " ")
            .contains(&needle)
        {
            pids.push(pid);
        }
    }
    pids
}

/// `gru bench sink` on a free port, recording the control ids it receives.
pub struct Sink {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub record: PathBuf,
    /// Kept open so the sink can print its summary at exit.
    stdout: BufReader<std::process::ChildStdout>,
    _dir: tempfile::TempDir,
}

impl Sink {
    pub fn start() -> Sink {
        Sink::start_on("127.0.0.1:0")
    }

    /// A sink on a given address (e.g. one a test reserved for later).
    pub fn start_on(listen: &str) -> Sink {
        Sink::start_with(listen, &[])
    }

    /// A sink with more `gru bench sink` arguments (e.g. `--ack-delay`).
    pub fn start_with(listen: &str, args: &[&str]) -> Sink {
        let dir = tempfile::tempdir().expect("tempdir");
        let record = dir.path().join("received.txt");
        let mut cmd = Command::new(GRU);
        cmd.args(["bench", "sink", "--listen", listen, "--record"])
            .arg(&record)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut proc = Proc::spawn("gru bench sink", &mut cmd);
        let mut stdout = BufReader::new(proc.child.stdout.take().expect("stdout"));
        let mut first = String::new();
        stdout.read_line(&mut first).expect("sink's first line");
        let addr = first
            .trim()
            .strip_prefix("sink listening on ")
            .unwrap_or_else(|| panic!("unexpected first line from the sink: {first:?}"))
            .parse()
            .expect("sink address");
        Sink {
            proc,
            addr,
            record,
            stdout,
            _dir: dir,
        }
    }

    /// Stops the sink and returns every control id it received.
    pub fn stop(mut self) -> std::collections::HashSet<String> {
        let status = self.proc.stop(Duration::from_secs(10));
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut self.stdout, &mut rest);
        assert!(status.success(), "sink exited with {status}: {rest}");
        read_lines(&self.record)
    }
}

pub fn read_lines(path: &Path) -> std::collections::HashSet<String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Starts `gru bench engine --listen 127.0.0.1:0` with `args` and returns it
/// with the address it listens on and the rest of its output.
pub fn bench_engine(args: &[&str]) -> (Proc, String, BufReader<std::process::ChildStdout>) {
    let mut cmd = Command::new(GRU);
    cmd.args(["bench", "engine", "--listen", "127.0.0.1:0"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut proc = Proc::spawn("gru bench engine", &mut cmd);
    let mut out = BufReader::new(proc.child.stdout.take().expect("stdout"));
    let mut first = String::new();
    out.read_line(&mut first).expect("engine's first line");
    let addr = first
        .trim()
        .strip_prefix("engine listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {first:?}"))
        .to_owned();
    (proc, addr, out)
}

/// A loopback port that nothing listened on a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Starts `gru bench drive` against `target`, recording ACKed control ids.
pub fn drive(target: SocketAddr, record: &Path, args: &[&str]) -> Proc {
    let mut cmd = Command::new(GRU);
    cmd.args(["bench", "drive", "--json", "--target"])
        .arg(target.to_string())
        .arg("--record")
        .arg(record)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    Proc::spawn("gru bench drive", &mut cmd)
}

/// Waits for a driver to finish and returns its JSON summary.
pub fn drive_summary(mut p: Proc, deadline: Duration) -> Value {
    let status = p.wait_exit(deadline);
    assert!(status.success(), "gru bench drive exited with {status}");
    let mut out = String::new();
    std::io::Read::read_to_string(p.child.stdout.as_mut().expect("stdout"), &mut out)
        .expect("read");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("driver summary is not JSON ({e}): {out}"))
}
