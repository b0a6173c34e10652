//! Several controllers, one leading (DESIGN.md, High availability): the
//! minion agent and the CLI find the leader. Everything is real and on
//! loopback: the leader is the real controller (SQLite store, in this
//! process, over its real gRPC API with TLS), the standby is
//! `gru_controller::ha::serve_standby` with the same TLS and a lease that
//! names the leader, the minion is the real agent (in this process, with a
//! stub engine), and the CLI is the real `gru` binary.
//!
//! Each test stands up its own controllers on free ports; every wait has a
//! deadline.

mod cli;
mod minion;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gru_controller::ha::{Leadership, LeaseStatus};
use gru_controller::pki::DevPki;
use gru_controller::registry::MinionRecord;
use gru_controller::store::SqliteStore;
use gru_controller::{Controller, ControllerConfig, FleetRuntime};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Every wait for a condition gives up after this long.
pub const DEADLINE: Duration = Duration::from_secs(20);
pub const FLEET: &str = "ha";
pub const TOKEN: &str = "ha-join-token";
/// The queue the stub engine reports: a report the leader holds carries it.
pub const QUEUE: u64 = 7;

/// Polls `f` until it returns Some, or panics naming `what` at the deadline.
pub async fn wait_until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "timed out after {DEADLINE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A loopback address nothing listens on (it was free a moment ago).
pub fn dead_address() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    format!("https://127.0.0.1:{port}")
}

/// The certificates, token and config every controller of a test shares.
pub struct Site {
    pub dir: tempfile::TempDir,
    pub config: ControllerConfig,
}

impl Site {
    pub fn make() -> Site {
        gru_proto::install_crypto_provider();
        let dir = tempfile::tempdir().expect("tempdir");
        DevPki::in_dir(dir.path()).ensure().expect("dev PKI");
        std::fs::write(dir.path().join("token"), TOKEN).expect("token");
        let config = Site::config(dir.path(), "token");
        // Made up front, as for controllers that share a store: every one
        // of them, standbys too, reads it.
        std::fs::create_dir_all(&config.state_dir).expect("state dir");
        gru_controller::pki::Ca::load_or_create(
            &config.minion_ca.cert,
            &config.minion_ca.key,
            "gru test: minion CA",
        )
        .expect("minion CA");
        Site { dir, config }
    }

    /// A controller config in `dir` with one local fleet (whose group the
    /// test provides) and the join token in `token`.
    fn config(dir: &Path, token: &str) -> ControllerConfig {
        ControllerConfig::parse(
            &dir.join("controller.toml"),
            &format!(
                "listen = \"127.0.0.1:0\"\nreport_interval = \"200ms\"\n\
                 join_token_file = \"{token}\"\nstate_dir = \"state\"\n\
                 [tls]\ncert = \"controller.pem\"\nkey = \"controller.key\"\nclient_ca = \"ca.pem\"\n\
                 [[fleet]]\nname = \"{FLEET}\"\nprovider = \"local\"\nmin = 1\nmax = 3\n\
                 [fleet.local]\nlisten = \"127.0.0.1:0\"\nminion_config = \"unused.toml\"\n"
            ),
        )
        .expect("controller config")
    }

    /// The same site's config with another join token (the same CA, store
    /// and minion CA).
    pub fn config_with_token(&self, token: &str) -> ControllerConfig {
        std::fs::write(self.dir.path().join("other-token"), token).expect("token");
        Site::config(self.dir.path(), "other-token")
    }

    /// A minion config naming `controllers` (TOML values, in order).
    pub fn minion_config(&self, controllers: &[&str]) -> gru_minion::MinionConfig {
        gru_minion::MinionConfig::parse(
            &self.dir.path().join("minion.toml"),
            &format!(
                "controller = {}\nca_file = \"ca.pem\"\nfleet = \"{FLEET}\"\n\
                 join_token_file = \"token\"\n[engine]\nlisten = \"127.0.0.1:0\"\n\
                 downstream = \"127.0.0.1:9\"\n",
                toml_list(controllers)
            ),
        )
        .expect("minion config")
    }

    /// A client config (the dev admin certificate) naming `controllers`;
    /// returns its path.
    pub fn client_config(&self, name: &str, controllers: &[&str]) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                "controller = {}\nca_file = \"ca.pem\"\ncert_file = \"admin.pem\"\nkey_file = \"admin.key\"\n",
                toml_list(controllers)
            ),
        )
        .expect("client config");
        path
    }
}

fn toml_list(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|a| format!("{a:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

/// A real controller on a SQLite store, serving on loopback until stopped
/// or dropped. It runs on a runtime of its own, so that stopping it ends
/// everything it runs, its connections too, as the end of its process
/// would.
pub struct Leader {
    pub address: String,
    pub controller: Arc<Controller>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Leader {
    /// Starts one on a free port, for a group holding `instances`.
    pub fn start(config: ControllerConfig, instances: &[&str]) -> Leader {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        Leader::start_on(config, listener, instances)
    }

    /// Starts one on `listener`.
    pub fn start_on(
        config: ControllerConfig,
        listener: std::net::TcpListener,
        instances: &[&str],
    ) -> Leader {
        let address = format!("https://{}", listener.local_addr().expect("addr"));
        let token = std::fs::read_to_string(config.join_token_file.as_ref().expect("token file"))
            .expect("token")
            .trim()
            .to_owned();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let group = gru_cloud::testing::ScriptedGroup::new(instances);
        let fleet = FleetRuntime::new(config.fleets[0].clone(), group.clone(), group);
        let store = SqliteStore::open(&config.state_dir).expect("store");
        let controller = {
            let _inside = runtime.enter();
            Controller::new(config, vec![fleet], token, Arc::new(store)).expect("controller")
        };
        listener.set_nonblocking(true).expect("nonblocking");
        let c = controller.clone();
        runtime.spawn(async move {
            let listener = TcpListener::from_std(listener).expect("listener");
            gru_controller::run(c, listener, std::future::pending())
                .await
                .expect("the controller ran");
        });
        Leader {
            address,
            controller,
            runtime: Some(runtime),
        }
    }

    /// The minion of `instance`, if it reported (the stub's queue) over a
    /// Session that is open now.
    pub fn reporting(&self, instance: &str) -> Option<String> {
        let fleet = self.controller.fleet(FLEET)?;
        let reg = fleet.registry();
        let m: &MinionRecord = reg.minions().find(|m| m.instance.0 == instance)?;
        let reported = m
            .last_report
            .as_ref()
            .is_some_and(|r| r.queue_depth == QUEUE);
        (reported && m.session.is_some()).then(|| m.id.clone())
    }

    /// Stops it at once: its tasks end and its connections close.
    pub fn stop(mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A standby: the real standby server, with the site's TLS, waiting under a
/// lease the test sets.
pub struct Standby {
    pub address: String,
    pub lease: Arc<FixedLease>,
    task: JoinHandle<()>,
}

impl Standby {
    /// Starts one on a free port naming `leader` (an address) as the leader.
    pub async fn start(config: &ControllerConfig, leader: &str) -> Standby {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = format!("https://{}", listener.local_addr().expect("addr"));
        let lease = Arc::new(FixedLease(Mutex::new(LeaseStatus::default())));
        lease.names(leader);
        let config = config.clone();
        let leadership: Arc<dyn Leadership> = lease.clone();
        let task = tokio::spawn(async move {
            gru_controller::ha::serve_standby(
                &config,
                listener,
                leadership,
                std::future::pending(),
            )
            .await
            .expect("the standby ran");
        });
        Standby {
            address,
            lease,
            task,
        }
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A lease the test sets: this standby waits, `leader` holds it.
pub struct FixedLease(Mutex<LeaseStatus>);

impl FixedLease {
    pub fn names(&self, leader_address: &str) {
        *self.0.lock().expect("lease") = LeaseStatus {
            controller: "standby-1".to_owned(),
            leading: false,
            leader: "leader-1".to_owned(),
            leader_address: leader_address.to_owned(),
            leader_since_ms: 1_780_000_000_000,
            version: 42,
            duration_ms: 15_000,
            store: "dynamodb:gru-test".to_owned(),
        };
    }
}

impl Leadership for FixedLease {
    fn status(&self) -> LeaseStatus {
        self.0.lock().expect("lease").clone()
    }
}

/// What this thread logged, for a test to read (installed for the test's
/// current-thread runtime, where the agent's tasks run too).
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    pub fn capture() -> (Logs, tracing::subscriber::DefaultGuard) {
        let logs = Logs::default();
        let sink = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || sink.clone())
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("logs")).into_owned()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("logs").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The key a standby names the leader under is the one the agent (and the
/// CLI, through it) reads: the agent keeps its own copy, not depending on
/// the controller crate.
#[test]
fn the_agent_reads_the_leader_where_the_standby_writes_it() {
    assert_eq!(
        gru_minion::agent::LEADER_METADATA,
        gru_controller::ha::LEADER_METADATA
    );
}

/// A controller resuming minions (after a restart or a takeover) waits as
/// long as an agent can take to notice that its controller stalled.
#[test]
fn a_resumed_minion_gets_as_long_as_its_agent_takes_to_notice_a_stalled_controller() {
    assert_eq!(
        gru_minion::agent::KEEPALIVE_INTERVAL + gru_minion::agent::KEEPALIVE_TIMEOUT,
        gru_controller::registry::RESUME_GRACE
    );
}
