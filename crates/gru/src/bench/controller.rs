//! `gru bench controller`: how many minions one controller holds, and what
//! each one costs it.
//!
//! The server under test runs in a child process (`gru bench
//! controller-target`, hidden): either the real controller, with its SQLite
//! store and a fleet whose group lists N instances and starts nothing, or a
//! bare gRPC server with the same TLS front door and HTTP/2 settings that
//! answers Join, reads Sessions and counts reports, and does nothing else
//! (the baseline). This process is the driver: each simulated minion opens
//! its own TCP and TLS connection, Joins, opens its Session and reports
//! every interval (first at a random phase, then with ±5 % jitter), as the
//! agent does.
//!
//! At each step the driver ramps up to N minions, waits until the
//! controller has them all in service and one report interval more, then
//! measures over a window: the server's CPU (from /proc) and RSS, the
//! reports it applied, and the driver's own CPU (the same two cores).
//!
//! Report-to-registry latency is the controller's own histogram
//! `gru_minion_report_delay_seconds`: from the moment the driver stamps a
//! report (`sent_at_unix_us`, just before the report is queued on its
//! Session) to the moment the controller has applied it to the fleet's
//! registry. The bare server keeps the same histogram up to the moment it
//! has decoded the report, so the difference is the controller's own. Both
//! clocks are this machine's. The quantiles are interpolated
//! within the histogram's buckets, as Prometheus's `histogram_quantile`
//! does, from the difference of two scrapes around the window.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::{Context, anyhow, bail};
use async_trait::async_trait;
use clap::{Args, ValueEnum};
use gru_cloud::{
    CapacityGroup, CloudError, GroupState, Instance, InstanceId, InstanceLifecycle, Target,
    TargetGroup, TargetState,
};
use gru_controller::config::{
    HTTP2_KEEPALIVE_INTERVAL, HTTP2_KEEPALIVE_TIMEOUT, MAX_CONCURRENT_STREAMS, TlsFiles,
};
use gru_controller::pki::{DevPki, SERVER_NAME};
use gru_controller::store::SqliteStore;
use gru_controller::{ControllerConfig, FleetRuntime, front_door};
use gru_proto::v1 as pb;
use pb::minion_service_client::MinionServiceClient;
use pb::minion_service_server::{MinionService, MinionServiceServer};
use rand::Rng;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Server};
use tonic::{Request, Response, Status, Streaming};

use super::agent::{TICKS_PER_SEC, sample};
use super::{end_progress, progress};

const TOKEN: &str = "bench-controller-token";
const FLEET: &str = "bench";
/// Open files the driver and the server need besides one per minion.
const FD_SPARE: u64 = 1024;
/// Connections from one loopback source address: below the ephemeral port
/// range's 28,232 ports, which bound connections from one address to one.
const PER_SOURCE: u32 = 20_000;
/// How long the server may take to start, and to take the minions of one
/// step into service (on top of a second per thousand minions).
const START: Duration = Duration::from_secs(60);
/// Attempts per Join before the run fails.
const JOIN_ATTEMPTS: u32 = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetKind {
    /// The real controller: registry, SQLite store, reconcile loop, metrics.
    Controller,
    /// A gRPC server with the controller's TLS and HTTP/2 settings that
    /// only counts reports: the baseline.
    Bare,
}

#[derive(Args)]
pub struct ControllerArgs {
    /// How many minions at each step, in increasing order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1000,5000,10000,20000,50000"
    )]
    minions: Vec<u32>,
    /// How long to measure at each step, once every minion reports.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    window: Duration,
    /// The minions' report interval (the controller's setting too).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    report_interval: Duration,
    /// Joins in progress at once while ramping up.
    #[arg(long, default_value_t = 32)]
    join_concurrency: usize,
    /// Which servers to measure, in turn.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "controller,bare"
    )]
    targets: Vec<TargetKind>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// The server under test, run by `gru bench controller` in a child process.
#[derive(Args)]
pub struct TargetArgs {
    #[arg(long, value_enum)]
    kind: TargetKind,
    /// Instances in the fleet's group.
    #[arg(long)]
    instances: u32,
    /// Connections the driver will open.
    #[arg(long)]
    connections: u32,
    /// Holds the certificates and the join token; the store goes here too.
    #[arg(long)]
    dir: PathBuf,
    #[arg(long, value_parser = humantime::parse_duration)]
    report_interval: Duration,
}

#[derive(Debug, Serialize)]
pub struct Step {
    target: TargetKind,
    minions: u32,
    /// Joins completed per second while ramping up to this step (TCP and
    /// TLS connect, Join, Session opened).
    joins_per_sec: f64,
    /// Joins that failed and were tried again.
    join_retries: u64,
    /// The server's CPU over the window, in cores.
    cpu_cores: f64,
    rss_mib: f64,
    /// (RSS at this step - RSS with no minion) / minions.
    kib_per_minion: f64,
    /// Reports the server counted per second over the window.
    reports_per_sec: f64,
    /// Reports the driver sent per second over the window.
    sent_per_sec: f64,
    /// The server's CPU per report it counted, all its work included.
    cpu_us_per_report: f64,
    /// Report-to-registry latency (to decoded, for the bare server).
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    /// The controller's reconcile pass over the window, mean (none for the
    /// bare server).
    pass_ms: Option<f64>,
    /// The driver's own CPU over the window, in cores.
    driver_cpu_cores: f64,
    /// Sessions the server ended during the step (should be 0).
    sessions_ended: u64,
}

#[derive(Debug, Serialize)]
pub struct Ratio {
    minions: u32,
    /// Controller CPU per report / bare server CPU per report.
    controller_over_bare: f64,
}

#[derive(Debug, Serialize)]
pub struct ControllerReport {
    report_interval_ms: u64,
    window_secs: f64,
    cpus: usize,
    open_files_limit: u64,
    steps: Vec<Step>,
    ratios: Vec<Ratio>,
}

/// Raises this process's open-file limit towards `want` (the hard limit
/// too, where the process may); returns the limit in force, which may be
/// lower.
fn raise_nofile(want: u64) -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let now = getrlimit(Resource::Nofile);
    let soft = now.current.unwrap_or(u64::MAX);
    if soft >= want {
        return soft;
    }
    let hard = now.maximum.unwrap_or(u64::MAX);
    let raised = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(want),
            maximum: Some(hard.max(want)),
        },
    );
    if raised.is_ok() {
        return want;
    }
    // Not allowed past the hard limit: go as far as it.
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(hard),
            maximum: Some(hard),
        },
    );
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Checks that `connections` fit under this process's open-file limit,
/// raising it first.
fn fit_connections(connections: u32) -> anyhow::Result<u64> {
    let want = u64::from(connections) + FD_SPARE;
    let got = raise_nofile(want);
    if got < want {
        bail!(
            "{connections} connections need {want} open files in the driver and in the \
             server, and this process may open {got}: raise the hard limit (`ulimit -Hn`, \
             limits.conf or systemd's LimitNOFILE) or run fewer minions (each minion's \
             Session has its own connection: it presents the minion's own certificate)"
        );
    }
    Ok(got)
}

/// A group that starts and stops nothing: it lists the instances of the
/// step the driver is at (`grow`, told on the target's stdin), so each
/// step's passes see that step's fleet, not the largest one. The fleet's
/// bounds are the largest step's size: the policy asks for it at once,
/// which sets the desired size and starts nothing.
struct StaticGroup {
    state: std::sync::Mutex<GroupState>,
    registered: std::sync::Mutex<std::collections::HashSet<InstanceId>>,
}

fn instance_id(k: u32) -> String {
    format!("i-bench{k:07}")
}

impl StaticGroup {
    fn new(max: u32) -> Self {
        StaticGroup {
            state: std::sync::Mutex::new(GroupState {
                desired: 0,
                min: 0,
                max,
                instances: Vec::new(),
            }),
            registered: Default::default(),
        }
    }

    /// Lists instances up to `n` in service, as a scale-out would.
    fn grow(&self, n: u32) {
        let launched_at = SystemTime::now();
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let have = s.instances.len() as u32;
        let to = n.min(s.max);
        s.instances.extend((have..to).map(|k| Instance {
            id: InstanceId(instance_id(k)),
            lifecycle: InstanceLifecycle::InService,
            launched_at,
        }));
    }
}

#[async_trait]
impl CapacityGroup for StaticGroup {
    async fn describe(&self) -> Result<GroupState, CloudError> {
        Ok(self.state.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
    async fn set_desired(&self, desired: u32) -> Result<(), CloudError> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if desired > s.max {
            return Err(CloudError::OutOfBounds {
                desired,
                min: s.min,
                max: s.max,
            });
        }
        s.desired = desired;
        Ok(())
    }
    async fn terminate(&self, id: &InstanceId, decrement: bool) -> Result<(), CloudError> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.instances.retain(|i| &i.id != id);
        if decrement {
            s.desired = s.desired.saturating_sub(1);
        }
        Ok(())
    }
}

#[async_trait]
impl TargetGroup for StaticGroup {
    async fn register(&self, target: &Target) -> Result<(), CloudError> {
        let mut r = self.registered.lock().unwrap_or_else(|p| p.into_inner());
        r.insert(target.instance.clone());
        Ok(())
    }
    async fn deregister(&self, target: &Target) -> Result<(), CloudError> {
        let mut r = self.registered.lock().unwrap_or_else(|p| p.into_inner());
        r.remove(&target.instance);
        Ok(())
    }
    async fn target_state(&self, target: &Target) -> Result<TargetState, CloudError> {
        let r = self.registered.lock().unwrap_or_else(|p| p.into_inner());
        Ok(if r.contains(&target.instance) {
            TargetState::Healthy
        } else {
            TargetState::Unused
        })
    }
}

/// The join timeout is long: the driver joins a step's minions over a while,
/// and the controller would replace those still waiting, as it should.
fn controller_toml(listen: SocketAddr, report_interval: Duration, n: u32) -> String {
    format!(
        "listen = \"{listen}\"\nreport_interval = \"{}\"\n\
         join_token_file = \"token\"\nstate_dir = \"state\"\n\
         join_timeout = \"24h\"\n\
         [tls]\ncert = \"controller.pem\"\nkey = \"controller.key\"\nclient_ca = \"ca.pem\"\n\
         [[fleet]]\nname = \"{FLEET}\"\nprovider = \"local\"\nmin = {n}\nmax = {n}\n\
         [fleet.local]\nlisten = \"127.0.0.1:0\"\nminion_config = \"unused.toml\"\n",
        humantime::format_duration(report_interval),
    )
}

/// The bare baseline: Join answered, Sessions read, reports counted.
struct Bare {
    reports: prometheus_client::metrics::counter::Counter,
    /// From the report's stamp to its decoding here.
    delay: prometheus_client::metrics::histogram::Histogram,
    report_interval_ms: u32,
}

type CommandStream =
    Pin<Box<dyn futures::Stream<Item = Result<pb::ControllerCommand, Status>> + Send>>;

#[tonic::async_trait]
impl MinionService for Bare {
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let r = request.into_inner();
        Ok(Response::new(pb::JoinResponse {
            minion_id: r.instance_id,
            session_token: "bare".to_owned(),
            settings: Some(pb::Settings {
                report_interval_ms: self.report_interval_ms,
            }),
            // Reports are what is compared; the bare server issues no
            // certificates, and its Sessions' connections present none.
            certificate: None,
        }))
    }

    type SessionStream = CommandStream;

    async fn session(
        &self,
        request: Request<Streaming<pb::SessionMessage>>,
    ) -> Result<Response<CommandStream>, Status> {
        let mut inbound = request.into_inner();
        inbound.message().await?;
        let (tx, rx) = mpsc::channel(1);
        let (reports, delay) = (self.reports.clone(), self.delay.clone());
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                reports.inc();
                if let Some(pb::session_message::Body::Report(r)) = m.body
                    && let Some(d) = gru_proto::since_stamp(r.sent_at_unix_us)
                {
                    delay.observe(d.as_secs_f64());
                }
            }
            drop(tx);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// `gru bench controller-target`: serves until its stdin closes.
pub async fn target(a: TargetArgs) -> anyhow::Result<()> {
    gru_proto::install_crypto_provider();
    fit_connections(a.connections)?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let metrics = TcpListener::bind("127.0.0.1:0").await?;
    let grpc = listener.local_addr()?;
    let metrics_addr = metrics.local_addr()?;
    let config = ControllerConfig::parse(
        &a.dir.join("controller.toml"),
        &controller_toml(grpc, a.report_interval, a.instances),
    )
    .map_err(|e| anyhow!("{e}"))?;
    // The driver says `instances N` on our stdin before each step, and
    // closes it when it is done (or dies).
    let group = Arc::new(StaticGroup::new(a.instances));
    let grow = group.clone();
    let stop = async move {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(n) = line
                .strip_prefix("instances ")
                .and_then(|n| n.trim().parse().ok())
            {
                grow.grow(n);
            }
        }
    };
    println!(
        "{}",
        serde_json::json!({"grpc": grpc.to_string(), "metrics": metrics_addr.to_string()})
    );
    match a.kind {
        TargetKind::Controller => {
            let fleet = FleetRuntime::new(config.fleets[0].clone(), group.clone(), group);
            let store = SqliteStore::open(&config.state_dir).map_err(|e| anyhow!("{e}"))?;
            gru_controller::serve(
                config,
                Arc::new(store),
                vec![fleet],
                listener,
                Some(metrics),
                None,
                stop,
            )
            .await
            .map_err(|e| anyhow!("{}", gru_core::error_chain(&e)))
        }
        TargetKind::Bare => {
            let mut prom = prometheus_client::registry::Registry::default();
            let bare = Bare {
                reports: Default::default(),
                delay: gru_controller::metrics::delay_histogram(),
                report_interval_ms: a.report_interval.as_millis() as u32,
            };
            prom.register(
                "gru_minion_reports",
                "Reports the bare server read",
                bare.reports.clone(),
            );
            prom.register(
                DELAY,
                "From the report's stamp to its decoding",
                bare.delay.clone(),
            );
            let site = gru_proto::metrics::Site::new(prom);
            let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
            tokio::spawn(gru_proto::metrics::serve(metrics, site, async {
                let _ = metrics_stopped.await;
            }));
            // The bare server issues no minion certificates: no minion CA.
            let files = TlsFiles {
                minion_ca: None,
                ..config.tls.clone()
            };
            let tls = front_door::tls_config(&files).map_err(|e| anyhow!("{e}"))?;
            let served = Server::builder()
                .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
                .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
                .max_concurrent_streams(Some(MAX_CONCURRENT_STREAMS))
                .add_service(MinionServiceServer::new(bare))
                .serve_with_incoming_shutdown(
                    front_door::incoming(listener, front_door::fixed(tls)),
                    stop,
                )
                .await;
            let _ = stop_metrics.send(());
            served.context("the bare server failed")
        }
    }
}

/// A running server under test.
struct UnderTest {
    child: Child,
    pid: u32,
    grpc: SocketAddr,
    metrics: SocketAddr,
}

async fn start_target(
    kind: TargetKind,
    dir: &Path,
    instances: u32,
    connections: u32,
    report_interval: Duration,
) -> anyhow::Result<UnderTest> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(["bench", "controller-target", "--kind"])
        .arg(
            kind.to_possible_value()
                .map(|v| v.get_name().to_owned())
                .unwrap_or_default(),
        )
        .arg("--instances")
        .arg(instances.to_string())
        .arg("--connections")
        .arg(connections.to_string())
        .arg("--dir")
        .arg(dir)
        .arg("--report-interval")
        .arg(humantime::format_duration(report_interval).to_string())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the server under test")?;
    let pid = child
        .id()
        .ok_or_else(|| anyhow!("the server exited at once"))?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(START, lines.next_line())
        .await
        .context("the server under test did not start in time")??
        .ok_or_else(|| anyhow!("the server under test exited before it listened"))?;
    let v: serde_json::Value = serde_json::from_str(&line)
        .with_context(|| format!("unexpected first line from the server: {line:?}"))?;
    let addr = |k: &str| -> anyhow::Result<SocketAddr> {
        v[k].as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("no {k} address in {line:?}"))
    };
    Ok(UnderTest {
        pid,
        grpc: addr("grpc")?,
        metrics: addr("metrics")?,
        child,
    })
}

/// One Prometheus scrape of the server, as `name{labels}` → value.
async fn scrape(addr: SocketAddr) -> anyhow::Result<Vec<(String, f64)>> {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    Ok(body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect())
}

fn value(samples: &[(String, f64)], name: &str) -> f64 {
    samples
        .iter()
        .filter(|(k, _)| k == name || k.starts_with(&format!("{name}{{")))
        .map(|(_, v)| v)
        .sum()
}

/// The cumulative buckets of a histogram, as (upper bound, count).
fn buckets(samples: &[(String, f64)], name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{");
    let mut b: Vec<(f64, f64)> = samples
        .iter()
        .filter(|(k, _)| k.starts_with(&prefix))
        .filter_map(|(k, v)| {
            let le = k.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, *v))
        })
        .collect();
    b.sort_by(|x, y| x.0.total_cmp(&y.0));
    b
}

/// The q-quantile of the observations between two scrapes of a histogram,
/// interpolated within its bucket as Prometheus's `histogram_quantile`.
fn quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|&(le, n)| {
            let was = before
                .iter()
                .find(|(l, _)| *l == le)
                .map_or(0.0, |(_, n)| *n);
            (le, n - was)
        })
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, n) in &delta {
        if n >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let within = if n > lower.1 {
                (rank - lower.1) / (n - lower.1)
            } else {
                0.0
            };
            return Some(lower.0 + (le - lower.0) * within);
        }
        lower = (le, n);
    }
    None
}

/// The simulated minions and what they count.
struct Driver {
    endpoint: Endpoint,
    /// The minions' TLS settings, before each adds its own certificate.
    tls: ClientTlsConfig,
    /// One connection, without a client certificate, that every Join uses.
    joins: Connection,
    /// Which block of loopback source addresses this run's minions use.
    block: u8,
    interval: Duration,
    stop: CancellationToken,
    sent: Arc<AtomicU64>,
    ended: Arc<AtomicU64>,
    retries: Arc<AtomicU64>,
    minions: JoinSet<()>,
    /// Minions per connection, and the connections by index.
    per_connection: u32,
    connections: HashMap<u32, Connection>,
}

/// One TCP and TLS connection, made by the first minion that needs it.
type Connection = Arc<tokio::sync::OnceCell<Channel>>;

fn report(seq: u64) -> pb::SessionMessage {
    pb::SessionMessage {
        body: Some(pb::session_message::Body::Report(pb::MinionReport {
            seq,
            queue_depth: 0,
            in_flight: 0,
            processed_total: 0,
            failed_total: 0,
            health: pb::EngineHealth::Healthy as i32,
            open_connections: 0,
            draining: false,
            drained: false,
            sent_at_unix_us: gru_proto::report_stamp(),
            can_shed: false,
        })),
    }
}

/// One minion: connect, Join, open the Session; the returned future reports
/// until the run stops or the Session ends.
async fn join(
    (join_endpoint, joins): (Endpoint, Connection),
    (endpoint, tls, connection): (Endpoint, ClientTlsConfig, Connection),
    k: u32,
    interval: Duration,
    sent: Arc<AtomicU64>,
    ended: Arc<AtomicU64>,
    stop: CancellationToken,
) -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    // As the agent does: a key of its own, and a request for a certificate.
    let key = rcgen::KeyPair::generate().context("key")?;
    let csr_pem = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .context("certificate request")?;
    let channel = joins
        .get_or_try_init(|| join_endpoint.connect())
        .await
        .context("connect")?
        .clone();
    let joined = MinionServiceClient::new(channel)
        .join(pb::JoinRequest {
            fleet: FLEET.to_owned(),
            instance_id: instance_id(k),
            engine_address: "127.0.0.1:9".to_owned(),
            metrics_address: String::new(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            identity: Some(pb::join_request::Identity::JoinToken(TOKEN.to_owned())),
            csr_pem,
        })
        .await
        .context("Join")?
        .into_inner();
    // The Session's connection presents the certificate Join issued (the
    // bare server issues none).
    let endpoint = match &joined.certificate {
        Some(c) => endpoint.tls_config(
            tls.identity(Identity::from_pem(&c.certificate_pem, key.serialize_pem())),
        )?,
        None => endpoint,
    };
    let channel = connection
        .get_or_try_init(|| endpoint.connect())
        .await
        .context("connect")?
        .clone();
    let mut client = MinionServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    tx.send(pb::SessionMessage {
        body: Some(pb::session_message::Body::Hello(pb::SessionHello {
            minion_id: joined.minion_id,
            session_token: joined.session_token,
        })),
    })
    .await
    .map_err(|_| anyhow!("the Session closed before its hello"))?;
    let mut commands = client
        .session(ReceiverStream::new(rx))
        .await
        .context("Session")?
        .into_inner();
    Ok(async move {
        let mut next = Instant::now() + interval.mul_f64(rand::rng().random_range(0.0..1.0));
        let mut seq = 0;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep_until(next) => {
                    seq += 1;
                    if tx.send(report(seq)).await.is_err() {
                        ended.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                    next += interval.mul_f64(rand::rng().random_range(0.95..1.05));
                }
                c = commands.message() => {
                    if !matches!(c, Ok(Some(_))) {
                        ended.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
        }
        // Keep the client (and its connection) until the end.
        drop(client);
    })
}

impl Driver {
    fn new(
        grpc: SocketAddr,
        ca: Vec<u8>,
        block: u8,
        interval: Duration,
        per_connection: u32,
    ) -> anyhow::Result<Self> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .domain_name(SERVER_NAME);
        let tls_for_minions = tls.clone();
        // The agent's own connection settings.
        let endpoint = Endpoint::from_shared(format!("https://{grpc}"))?
            .tls_config(tls)?
            .connect_timeout(gru_minion::agent::CONNECT_TIMEOUT)
            .http2_keep_alive_interval(gru_minion::agent::KEEPALIVE_INTERVAL)
            .keep_alive_timeout(gru_minion::agent::KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        Ok(Driver {
            endpoint,
            tls: tls_for_minions,
            joins: Connection::default(),
            block,
            interval,
            stop: CancellationToken::new(),
            sent: Default::default(),
            ended: Default::default(),
            retries: Default::default(),
            minions: JoinSet::new(),
            per_connection,
            connections: HashMap::new(),
        })
    }

    /// Joins minions `from..to`, `concurrency` at a time.
    async fn ramp(&mut self, from: u32, to: u32, concurrency: usize) -> anyhow::Result<()> {
        let mut joining = JoinSet::new();
        let mut next = from;
        let mut done = from;
        let mut shown = std::time::Instant::now();
        while done < to {
            while next < to && joining.len() < concurrency {
                let k = next;
                next += 1;
                let c = k / self.per_connection;
                let connection = self.connections.entry(c).or_default().clone();
                // Spread over loopback source addresses: one address has
                // too few ephemeral ports for tens of thousands.
                let source = Ipv4Addr::new(127, 0, self.block, 1 + (c / PER_SOURCE) as u8);
                let endpoint = self
                    .endpoint
                    .clone()
                    .local_address(Some(IpAddr::V4(source)));
                let (joins, join_endpoint, tls) =
                    (self.joins.clone(), self.endpoint.clone(), self.tls.clone());
                let (interval, sent, ended, retries, stop) = (
                    self.interval,
                    self.sent.clone(),
                    self.ended.clone(),
                    self.retries.clone(),
                    self.stop.clone(),
                );
                joining.spawn(async move {
                    let mut attempt = 1;
                    loop {
                        match join(
                            (join_endpoint.clone(), joins.clone()),
                            (endpoint.clone(), tls.clone(), connection.clone()),
                            k,
                            interval,
                            sent.clone(),
                            ended.clone(),
                            stop.clone(),
                        )
                        .await
                        {
                            Ok(run) => return Ok(run),
                            Err(e) if attempt >= JOIN_ATTEMPTS => {
                                return Err(e.context(format!(
                                    "minion {k} could not join in {JOIN_ATTEMPTS} attempts"
                                )));
                            }
                            Err(_) => {
                                retries.fetch_add(1, Ordering::Relaxed);
                                attempt += 1;
                                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt)))
                                    .await;
                            }
                        }
                    }
                });
            }
            let Some(joined) = joining.join_next().await else {
                break;
            };
            let run = joined.context("a joining minion panicked")??;
            self.minions.spawn(run);
            done += 1;
            if shown.elapsed() >= Duration::from_secs(1) {
                progress(&format!("  joined {done}/{to}"));
                shown = std::time::Instant::now();
            }
        }
        Ok(())
    }

    async fn stop(mut self) {
        self.stop.cancel();
        while self.minions.join_next().await.is_some() {}
        self.connections.clear();
    }
}

/// Waits until the controller has every minion in service.
async fn in_service(metrics: SocketAddr, n: u32) -> anyhow::Result<()> {
    let deadline = Instant::now() + START + Duration::from_secs(u64::from(n / 1000));
    loop {
        let s = scrape(metrics).await?;
        let got = value(
            &s,
            &format!("gru_fleet_minions{{fleet=\"{FLEET}\",state=\"in_service\"}}"),
        );
        if got as u32 >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {got} of {n} minions came into service");
        }
        progress(&format!("  in service {got}/{n}"));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

const DELAY: &str = "gru_minion_report_delay_seconds";
const REPORTS: &str = "gru_minion_reports_total";
const PASS_SUM: &str = "gru_reconcile_duration_seconds_sum";
const PASS_COUNT: &str = "gru_reconcile_duration_seconds_count";

async fn run_target(
    kind: TargetKind,
    block: u8,
    a: &ControllerArgs,
    per_connection: u32,
) -> anyhow::Result<Vec<Step>> {
    let dir = tempfile::tempdir()?;
    DevPki::in_dir(dir.path())
        .ensure()
        .map_err(|e| anyhow!("{e}"))?;
    std::fs::write(dir.path().join("token"), TOKEN)?;
    let most = a.minions.iter().copied().max().unwrap_or(0);
    let connections = most.div_ceil(per_connection);
    let mut server = start_target(kind, dir.path(), most, connections, a.report_interval).await?;
    let ca = std::fs::read(dir.path().join("ca.pem"))?;
    let mut driver = Driver::new(server.grpc, ca, block, a.report_interval, per_connection)?;
    // Let the controller's first pass (which records every instance) end.
    if kind == TargetKind::Controller {
        let deadline = Instant::now() + START;
        while value(&scrape(server.metrics).await?, "gru_reconcile_passes_total") < 1.0 {
            if Instant::now() > deadline {
                bail!("the controller made no reconcile pass");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let idle = sample(server.pid)?;
    let mut steps = Vec::new();
    let mut have = 0;
    for &n in &a.minions {
        progress(&format!("{kind:?}: ramping to {n} minions"));
        let retries0 = driver.retries.load(Ordering::Relaxed);
        let ended0 = driver.ended.load(Ordering::Relaxed);
        if let Some(stdin) = server.child.stdin.as_mut() {
            use tokio::io::AsyncWriteExt;
            stdin
                .write_all(format!("instances {n}\n").as_bytes())
                .await
                .context("the server under test stopped")?;
            stdin.flush().await?;
        }
        let ramp = Instant::now();
        driver.ramp(have, n, a.join_concurrency).await?;
        let joins_per_sec = f64::from(n - have) / ramp.elapsed().as_secs_f64();
        have = n;
        if kind == TargetKind::Controller {
            in_service(server.metrics, n).await.with_context(|| {
                format!(
                    "while ramping to {n}, the controller ended {} Sessions (the simulated minions do not open them again) and {} joins were retried",
                    driver.ended.load(Ordering::Relaxed) - ended0,
                    driver.retries.load(Ordering::Relaxed) - retries0
                )
            })?;
        }
        // Every minion has begun its report loop.
        tokio::time::sleep(a.report_interval + Duration::from_millis(500)).await;
        progress(&format!(
            "{kind:?}: measuring {n} minions for {}",
            humantime::format_duration(a.window)
        ));
        let (s0, d0, m0, sent0) = (
            sample(server.pid)?,
            sample(std::process::id())?,
            scrape(server.metrics).await?,
            driver.sent.load(Ordering::Relaxed),
        );
        let t0 = Instant::now();
        tokio::time::sleep(a.window).await;
        let (s1, d1, m1, sent1) = (
            sample(server.pid)?,
            sample(std::process::id())?,
            scrape(server.metrics).await?,
            driver.sent.load(Ordering::Relaxed),
        );
        let secs = t0.elapsed().as_secs_f64();
        let cpu = (s1.own_ticks - s0.own_ticks) as f64 / TICKS_PER_SEC;
        let reports = value(&m1, REPORTS) - value(&m0, REPORTS);
        let (b0, b1) = (buckets(&m0, DELAY), buckets(&m1, DELAY));
        let (p50, p99) = (
            quantile(&b0, &b1, 0.50).map(|s| s * 1000.0),
            quantile(&b0, &b1, 0.99).map(|s| s * 1000.0),
        );
        let delta = |name: &str| value(&m1, name) - value(&m0, name);
        let passes = delta(PASS_COUNT);
        let pass_ms = (passes > 0.0).then(|| delta(PASS_SUM) / passes * 1000.0);
        steps.push(Step {
            target: kind,
            minions: n,
            joins_per_sec,
            join_retries: driver.retries.load(Ordering::Relaxed) - retries0,
            cpu_cores: cpu / secs,
            rss_mib: s1.rss_kib as f64 / 1024.0,
            kib_per_minion: s1.rss_kib.saturating_sub(idle.rss_kib) as f64 / f64::from(n),
            reports_per_sec: reports / secs,
            sent_per_sec: (sent1 - sent0) as f64 / secs,
            cpu_us_per_report: if reports > 0.0 {
                cpu * 1e6 / reports
            } else {
                0.0
            },
            p50_ms: p50,
            p99_ms: p99,
            pass_ms,
            driver_cpu_cores: (d1.own_ticks - d0.own_ticks) as f64 / TICKS_PER_SEC / secs,
            sessions_ended: driver.ended.load(Ordering::Relaxed) - ended0,
        });
        // Each step as it ends, so a long run that is stopped keeps them.
        if let Some(s) = steps.last() {
            end_progress();
            eprintln!(
                "{kind:?} at {n} minions: {:.3} cores, {:.1} µs/report, p99 {} ms, RSS {:.0} MiB",
                s.cpu_cores,
                s.cpu_us_per_report,
                s.p99_ms.map_or("-".to_owned(), |v| format!("{v:.2}")),
                s.rss_mib,
            );
        }
    }
    progress(&format!("{kind:?}: stopping {have} minions"));
    driver.stop().await;
    drop(server.child.stdin.take());
    if tokio::time::timeout(Duration::from_secs(30), server.child.wait())
        .await
        .is_err()
    {
        let _ = server.child.kill().await;
    }
    Ok(steps)
}

pub async fn run(a: ControllerArgs) -> anyhow::Result<()> {
    if a.minions.is_empty() || a.minions.contains(&0) {
        bail!("--minions: one or more counts, each at least 1");
    }
    if a.minions.windows(2).any(|w| w[0] >= w[1]) {
        bail!("--minions: counts in increasing order, e.g. 1000,5000,10000");
    }
    if a.join_concurrency == 0 {
        bail!("--join-concurrency: at least 1");
    }
    let most = a.minions.iter().copied().max().unwrap_or(0);
    gru_proto::install_crypto_provider();
    // One connection per minion, as on a real fleet: a Session's connection
    // presents that minion's certificate. (Joins share one connection.)
    let per_connection = 1;
    let limit = fit_connections(most.div_ceil(per_connection))?;
    if most.div_ceil(per_connection) / PER_SOURCE >= 250 {
        bail!("too many connections for the loopback source addresses; run fewer minions");
    }
    let mut steps = Vec::new();
    for (i, kind) in a.targets.iter().enumerate() {
        steps.extend(run_target(*kind, 1 + i as u8, &a, per_connection).await?);
    }
    end_progress();
    let per_report = |kind: TargetKind, n: u32| {
        steps
            .iter()
            .find(|s| s.target == kind && s.minions == n)
            .map(|s| s.cpu_us_per_report)
    };
    let ratios: Vec<Ratio> = a
        .minions
        .iter()
        .filter_map(|&n| {
            let c = per_report(TargetKind::Controller, n)?;
            let b = per_report(TargetKind::Bare, n)?;
            (b > 0.0).then(|| Ratio {
                minions: n,
                controller_over_bare: c / b,
            })
        })
        .collect();
    let report = ControllerReport {
        report_interval_ms: a.report_interval.as_millis() as u64,
        window_secs: a.window.as_secs_f64(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        open_files_limit: limit,
        steps,
        ratios,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn print_table(r: &ControllerReport) {
    println!(
        "{} CPUs; report every {} ms; measured {:.0} s per step; a connection per minion; \
         the driver shares the machine",
        r.cpus, r.report_interval_ms, r.window_secs
    );
    println!(
        "{:<10} {:>7} {:>8} {:>7} {:>8} {:>8} {:>9} {:>9} {:>8} {:>8} {:>8} {:>7}",
        "server",
        "minions",
        "joins/s",
        "cores",
        "RSS MiB",
        "KiB/min",
        "reports/s",
        "µs/report",
        "p50 ms",
        "p99 ms",
        "pass ms",
        "driver",
    );
    let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
    for s in &r.steps {
        println!(
            "{:<10} {:>7} {:>8.0} {:>7.3} {:>8.1} {:>8.1} {:>9.0} {:>9.1} {:>8} {:>8} {:>8} {:>7.3}",
            format!("{:?}", s.target).to_lowercase(),
            s.minions,
            s.joins_per_sec,
            s.cpu_cores,
            s.rss_mib,
            s.kib_per_minion,
            s.reports_per_sec,
            s.cpu_us_per_report,
            ms(s.p50_ms),
            ms(s.p99_ms),
            ms(s.pass_ms),
            s.driver_cpu_cores,
        );
        if s.sessions_ended > 0 || s.join_retries > 0 {
            println!(
                "           ({} sessions ended, {} joins retried)",
                s.sessions_ended, s.join_retries
            );
        }
    }
    for x in &r.ratios {
        println!(
            "controller/bare CPU per report at {} minions: {:.2}x",
            x.minions, x.controller_over_bare
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let before = vec![(0.001, 0.0), (0.01, 0.0), (f64::INFINITY, 0.0)];
        // 100 observations: 50 under 1 ms, 40 more under 10 ms, 10 above.
        let after = vec![(0.001, 50.0), (0.01, 90.0), (f64::INFINITY, 100.0)];
        assert_eq!(quantile(&before, &after, 0.5), Some(0.001));
        let p70 = quantile(&before, &after, 0.7).expect("p70");
        assert!((p70 - 0.0055).abs() < 1e-9, "{p70}");
        // Past the last finite bucket: its bound, as Prometheus answers.
        assert_eq!(quantile(&before, &after, 0.99), Some(0.01));
        // Only what happened between the scrapes counts.
        assert_eq!(quantile(&after, &after, 0.5), None);
    }

    #[test]
    fn scrapes_parse_into_series() {
        let s: Vec<(String, f64)> = vec![
            ("gru_minion_reports_total{fleet=\"a\"}".into(), 3.0),
            ("gru_minion_reports_total{fleet=\"b\"}".into(), 4.0),
            (format!("{DELAY}_bucket{{fleet=\"a\",le=\"0.5\"}}"), 2.0),
            (format!("{DELAY}_bucket{{fleet=\"a\",le=\"+Inf\"}}"), 3.0),
        ];
        assert_eq!(value(&s, REPORTS), 7.0);
        assert_eq!(buckets(&s, DELAY), vec![(0.5, 2.0), (f64::INFINITY, 3.0)]);
    }
}
