//! The service commands: `gru controller`, `gru minion` (the agent) and
//! `gru dev`, which writes a controller config, a minion config, a throwaway
//! CA and a client config into its state directory and runs the controller
//! with a local fleet, exactly as `gru controller` would.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use crate::providers::{self, BuiltFleet};
use anyhow::{Context, anyhow};
use clap::Args;
use gru_aws::dynamo::LeaseError;
use gru_controller::ControllerConfig;
use gru_controller::config::{DynamoStoreConfig, StoreConfig};
use gru_controller::pki::{self, DevPki};
use gru_controller::store::{SqliteStore, Store};
use gru_engine::bench::{self, SinkConfig, SinkHandle};
use gru_minion::MinionConfig;
use gru_minion::sd_notify::Notifier;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::EXIT_CONFIG;
use crate::bench::{interrupted, interrupted_or_hung_up};
use crate::client::{self, ClientConfig};
use crate::config_files::{
    self, ControllerFile, ControllerTls, LocalFleet, LocalProvider, MinionEngine, MinionFile,
};

/// The one fleet `gru dev` runs.
const LOCAL_FLEET: &str = "local";

#[derive(Args)]
pub struct DevArgs {
    /// Where the CA, configs, logs and state live (default: $XDG_STATE_HOME/gru/dev).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// The controller's gRPC address.
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Where the fleet's load balancer takes MLLP connections.
    #[arg(long, default_value = "127.0.0.1:2575")]
    lb_listen: SocketAddr,
    /// Where the controller serves Prometheus metrics (/metrics, /healthz,
    /// /sd/minions); each local minion serves its own on a free loopback
    /// port, listed by /sd/minions.
    #[arg(long, default_value = "127.0.0.1:9464", conflicts_with = "no_metrics")]
    metrics_listen: SocketAddr,
    /// Serve no metrics.
    #[arg(long)]
    no_metrics: bool,
    /// Where minions deliver messages; default: a built-in sink that ACKs and counts.
    #[arg(long)]
    downstream: Option<SocketAddr>,
    /// Fewest minions.
    #[arg(long, default_value_t = 1)]
    min: u32,
    /// Most minions.
    #[arg(long, default_value_t = 5)]
    max: u32,
    /// Queued plus in-flight messages one minion should carry.
    #[arg(long, default_value_t = 4)]
    target_queue: u32,
    /// Scale in only to the highest size wanted over this long.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    scale_in_stabilization: Duration,
    /// Wait this long after a scale-in before the next one.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    scale_in_cooldown: Duration,
    /// A TOML file of `[[fleet.schedule]]` tables for the local fleet
    /// (windows in IANA time zones that override min/max/desired).
    #[arg(long)]
    schedules: Option<PathBuf>,
    /// Engines close each connection at a message boundary after this age
    /// (jittered up to twice it), so load spreads to new minions; 0s = never.
    #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
    max_connection_age: Duration,
    /// Do not ask minions to shed connections onto new ones after a
    /// scale-out (rebalancing, on by default); only --max-connection-age
    /// then moves long-lived senders.
    #[arg(long)]
    no_rebalance: bool,
    /// The load balancer cuts connections this long after deregistration.
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    deregistration_delay: Duration,
    /// The built-in sink waits this long before each ACK (a slow downstream
    /// makes queues, and so scaling, visible).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    sink_ack_delay: Duration,
    /// Also drive this many messages per second through the load balancer.
    #[arg(long)]
    load: Option<f64>,
    /// Connections for --load.
    #[arg(long, default_value_t = 8)]
    load_connections: usize,
}

/// What `gru dev` is running, written to `<state>/dev.json` for scripts.
#[derive(Serialize)]
struct DevInfo {
    controller: String,
    load_balancer: SocketAddr,
    downstream: SocketAddr,
    client_config: PathBuf,
    state_dir: PathBuf,
    pid: u32,
    /// The controller's metrics, when on.
    metrics: Option<String>,
}

pub async fn run_controller(path: &Path, check_only: bool) -> ExitCode {
    // The files, directories and addresses are checked before anything
    // starts, with --check-config or without.
    let config = match ControllerConfig::load(path).and_then(|c| {
        c.check_environment(path)?;
        Ok(c)
    }) {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "invalid configuration: {}",
                gru_controller::reconcile::error_chain(&e)
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if check_only {
        println!(
            "config ok: {} fleet(s), listening on {}",
            config.fleets.len(),
            config.listen
        );
        return ExitCode::SUCCESS;
    }
    if let StoreConfig::Dynamodb(dynamo) = config.store.clone() {
        return match serve_shared(config, dynamo).await {
            Ok(Led::Stopped) => ExitCode::SUCCESS,
            Ok(Led::Deposed(why)) => {
                eprintln!(
                    "error: stepped down: {why}; exiting so that the service manager restarts this controller as a standby"
                );
                ExitCode::from(EXIT_DEPOSED)
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    match serve(config, None, None).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The metrics listener, when metrics are on.
async fn bind_metrics(at: Option<SocketAddr>) -> anyhow::Result<Option<TcpListener>> {
    match at {
        Some(at) => {
            Ok(Some(TcpListener::bind(at).await.with_context(|| {
                format!("cannot listen for metrics on {at}")
            })?))
        }
        None => Ok(None),
    }
}

/// `gru controller`'s exit status after it lost the leader lease (EX_TEMPFAIL:
/// systemd's Restart=on-failure starts it again, as a standby).
pub const EXIT_DEPOSED: u8 = 75;

/// How a controller on a shared store ended.
enum Led {
    /// Asked to stop (it handed the lease back if it held it).
    Stopped,
    /// It lost the lease and stopped acting.
    Deposed(LeaseError),
}

/// `gru controller` with `[store] kind = "dynamodb"`: a standby until the
/// lease is this controller's, then the leader until it is stopped or loses
/// the lease (DESIGN.md, High availability).
///
/// A standby binds its listeners, serves the standby API (every call points
/// at the leader) and builds no provider: it starts no minion and makes no
/// cloud call. Once it holds the lease it serves the controller on the same
/// listening socket, every capacity-changing call fenced by the lease.
async fn serve_shared(config: ControllerConfig, dynamo: DynamoStoreConfig) -> anyhow::Result<Led> {
    use gru_aws::dynamo::{self, DynamoStore, Fence, Lease, Verdict};

    let program =
        std::env::current_exe().context("cannot find the gru binary to start minions with")?;
    let client = dynamo::client(&dynamo.region, dynamo.endpoint_url.as_deref()).await;
    let fence = Fence::default();
    let store = Arc::new(
        DynamoStore::open(client.clone(), &dynamo.table, fence.clone())
            .await
            .map_err(|e| anyhow!(gru_controller::reconcile::error_chain(&e)))?,
    );
    let lease = Arc::new(Lease::new(
        client,
        &dynamo.table,
        dynamo.leader.clone(),
        fence,
    ));
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let metrics = bind_metrics(config.metrics_listen).await?;
    // One listening socket, two handles: the standby server serves on one
    // until the lease is taken, then the leader on the other (never bound
    // twice, so no connection is refused in between).
    let socket = listener.into_std()?;
    let standby_socket = TcpListener::from_std(socket.try_clone()?)?;
    let listener = TcpListener::from_std(socket)?;
    // The metrics address the same way: a standby answers there too (that
    // it is up and does not lead), so a scrape never finds it silent.
    let (standby_metrics, metrics) = match metrics {
        Some(m) => {
            let socket = m.into_std()?;
            (
                Some(TcpListener::from_std(socket.try_clone()?)?),
                Some(TcpListener::from_std(socket)?),
            )
        }
        None => (None, None),
    };

    let mut interrupt = armed_interrupt(false).await;
    let _ = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    let notifier = Notifier::from_env();
    notifier.ready();

    let (stop_standby, standby_stopped) = tokio::sync::oneshot::channel::<()>();
    let (stop_standby_metrics, standby_metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let standby_metrics = standby_metrics.map(|m| {
        tokio::spawn(gru_proto::metrics::serve(
            m,
            gru_controller::ha::standby_metrics_site(),
            async {
                let _ = standby_metrics_stopped.await;
            },
        ))
    });
    let standby = {
        let config = config.clone();
        let leadership = lease.clone();
        tokio::spawn(async move {
            gru_controller::ha::serve_standby(&config, standby_socket, leadership, async {
                let _ = standby_stopped.await;
            })
            .await
        })
    };
    tracing::info!(
        controller = %dynamo.leader.name,
        table = %dynamo.table,
        listen = %config.listen,
        "standing by for the leader lease"
    );
    let mut said: Option<(String, u64)> = None;
    let acquired = {
        let acquire = lease.acquire(|record, verdict| {
            let (who, term) = match record.filter(|r| !r.released) {
                Some(r) => (format!("{} at {}", r.holder, r.address), r.term),
                None => ("nobody".to_owned(), 0),
            };
            if said.as_ref() != Some(&(who.clone(), term)) {
                match verdict {
                    Verdict::Held(_) => tracing::info!(
                        leader = %who,
                        "standby: {who} leads; taking over if it stops renewing its lease"
                    ),
                    Verdict::Free => {
                        tracing::info!("standby: no controller leads; taking the lease")
                    }
                    Verdict::Expired => tracing::warn!(
                        leader = %who,
                        "standby: {who} stopped renewing its lease; taking over"
                    ),
                }
                said = Some((who, term));
            }
        });
        tokio::select! {
            r = acquire => Some(r),
            _ = &mut interrupt => None,
        }
    };
    let _ = stop_standby.send(());
    let _ = stop_standby_metrics.send(());
    if let Some(task) = standby_metrics {
        let _ = task.await;
    }
    match standby.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(anyhow!(gru_controller::reconcile::error_chain(&e))),
        Err(e) => return Err(anyhow!("the standby server failed: {e}")),
    }
    let term = match acquired {
        None => {
            notifier.stopping();
            return Ok(Led::Stopped);
        }
        Some(r) => r.map_err(|e| anyhow!(gru_controller::reconcile::error_chain(&e)))?,
    };
    tracing::info!(
        controller = %dynamo.leader.name,
        term,
        "took the leader lease; leading"
    );

    // Leading from here. The providers only now: a standby starts no minion.
    let mut built = Vec::new();
    for f in &config.fleets {
        built.push(providers::build(f, &program, &config.state_dir).await?);
    }
    let fleets = built
        .iter()
        .map(|b| dynamo::fence_fleet(b.runtime.clone(), lease.clone(), store.clone()))
        .collect();
    let deposed = Arc::new(std::sync::Mutex::new(None));
    let shutdown = {
        let lease = lease.clone();
        let deposed = deposed.clone();
        async move {
            tokio::select! {
                _ = interrupt => notifier.stopping(),
                why = lease.hold() => {
                    tracing::error!(error = %why, "lost the leader lease; stepping down");
                    *deposed.lock().expect("deposed lock") = Some(why);
                }
            }
        }
    };
    let leadership: Arc<dyn gru_controller::ha::Leadership> = lease.clone();
    let result = gru_controller::serve(
        config,
        store,
        fleets,
        listener,
        metrics,
        Some(leadership),
        shutdown,
    )
    .await;
    for b in &built {
        if let Some(local) = &b.local {
            local.load_balancer.shutdown();
            local.group.shutdown().await;
        }
    }
    let why = deposed.lock().expect("deposed lock").take();
    if why.is_none()
        && let Err(e) = lease.release().await
    {
        tracing::warn!(error = %e, "could not hand the lease back; a standby takes it once it lapses");
    }
    result.map_err(|e| anyhow!(gru_controller::reconcile::error_chain(&e)))?;
    Ok(match why {
        Some(why) => Led::Deposed(why),
        None => Led::Stopped,
    })
}

pub async fn run_minion(
    config: Option<PathBuf>,
    instance_id: Option<String>,
    check_only: bool,
) -> ExitCode {
    let Some(path) = config else {
        eprintln!(
            "invalid configuration: `gru minion` needs --config FILE (or a subcommand: ls, get)"
        );
        return ExitCode::from(EXIT_CONFIG);
    };
    let config = match MinionConfig::load(&path).and_then(|c| {
        for note in c.check_environment(&path)? {
            eprintln!("note: {note}");
        }
        Ok(c)
    }) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("invalid configuration: {}", gru_minion::error_chain(&e));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if check_only {
        let imds = match &config.aws {
            Some(aws) => format!(", instance metadata at {}", aws.imds_endpoint),
            None => String::new(),
        };
        println!(
            "config ok: fleet {}, controller {}{imds}",
            config.fleet, config.controller
        );
        return ExitCode::SUCCESS;
    }
    if instance_id.is_none() && config.aws.is_none() {
        eprintln!(
            "invalid configuration: --instance-id (or GRU_INSTANCE_ID) is required unless the config sets [aws] imds = true"
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    let notifier = Notifier::from_env();
    let shutdown = armed_interrupt(false).await;
    match gru_minion::run_service(config, instance_id, &notifier, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %gru_minion::error_chain(&e), "minion failed");
            ExitCode::FAILURE
        }
    }
}

/// Called once the controller's listeners are bound, with the fleets and
/// the controller's address.
/// The metrics address is there when the config turns metrics on.
type OnReady =
    Box<dyn FnOnce(&[BuiltFleet], SocketAddr, Option<SocketAddr>) -> anyhow::Result<()> + Send>;

/// Builds the providers and runs the controller until Ctrl-C or SIGTERM
/// (or, for `gru dev`, SIGHUP).
/// With `ready`, calls it once everything listens.
/// With `listener`, serves on it (already bound to `config.listen`).
async fn serve(
    config: ControllerConfig,
    ready: Option<OnReady>,
    listener: Option<TcpListener>,
) -> anyhow::Result<()> {
    let program =
        std::env::current_exe().context("cannot find the gru binary to start minions with")?;
    // The store first: a controller that cannot trust its memory must not
    // start (a corrupt file or one from a newer gru is left untouched).
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&config.state_dir)
            .map_err(|e| anyhow!(gru_controller::reconcile::error_chain(&e)))?,
    );
    let listener = match listener {
        Some(l) => l,
        None => TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?,
    };
    let addr = listener.local_addr()?;
    let metrics = bind_metrics(config.metrics_listen).await?;
    let metrics_addr = metrics.as_ref().map(|l| l.local_addr()).transpose()?;
    let mut built = Vec::new();
    for f in &config.fleets {
        built.push(providers::build(f, &program, &config.state_dir).await?);
    }
    let dev = ready.is_some();
    if let Some(ready) = ready {
        ready(&built, addr, metrics_addr)?;
    }
    // systemd (Type=notify): the listener is bound and the providers are
    // up, so connections are accepted from here on.
    let interrupt = armed_interrupt(dev).await;
    if !dev {
        // SIGHUP reloads the TLS files (`systemctl reload`). Its handler is
        // in place before READY=1, as SIGTERM's is: a reload right after
        // the start must not end the process. (A tokio signal handler stays
        // installed once registered; the controller's own listener takes
        // the signals from here.)
        let _ = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    }
    let notifier = Notifier::from_env();
    notifier.ready();
    let shutdown = async {
        interrupt.await;
        notifier.stopping();
    };
    let fleets = built.iter().map(|b| b.runtime.clone()).collect();
    let result =
        gru_controller::serve(config, store, fleets, listener, metrics, None, shutdown).await;
    for b in &built {
        if let Some(local) = &b.local {
            local.load_balancer.shutdown();
            local.group.shutdown().await;
        }
    }
    result.map_err(|e| anyhow!(gru_controller::reconcile::error_chain(&e)))
}

/// [`interrupted`], polled once so that its SIGTERM and Ctrl-C handlers are
/// in place before systemd hears READY=1: from then on systemd may stop the
/// service at any moment, and a SIGTERM that came before the handler would
/// kill the process without a drain. With `hangup`, SIGHUP stops it too
/// (`gru dev` in a terminal that closes); without, SIGHUP is left to the
/// controller, which reloads its TLS files on it.
async fn armed_interrupt(hangup: bool) -> Pin<Box<dyn Future<Output = ()>>> {
    let mut interrupt: Pin<Box<dyn Future<Output = ()>>> = if hangup {
        Box::pin(interrupted_or_hung_up())
    } else {
        Box::pin(interrupted())
    };
    match std::future::poll_fn(|cx| Poll::Ready(interrupt.as_mut().poll(cx))).await {
        Poll::Ready(()) => Box::pin(std::future::ready(())),
        Poll::Pending => interrupt,
    }
}

fn random_token() -> String {
    let mut rng = rand::rng();
    (0..32)
        .map(|_| format!("{:02x}", rng.random::<u8>()))
        .collect()
}

pub async fn run(a: DevArgs) -> ExitCode {
    match dev(a).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dev(a: DevArgs) -> anyhow::Result<()> {
    // Read before anything is made: a bad file stops gru dev here.
    let schedule_tables = match &a.schedules {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the schedules file {}", path.display()))?;
            Some((path.as_path(), schedules(path, &text)?))
        }
        None => None,
    };
    let state = a
        .state_dir
        .clone()
        .unwrap_or_else(client::default_state_dir);
    std::fs::create_dir_all(state.join("minions"))
        .with_context(|| format!("cannot create the state directory {}", state.display()))?;
    let state = state.canonicalize()?;
    let pki = DevPki::in_dir(&state);
    if pki.ensure()? {
        eprintln!(
            "made a throwaway CA and certificates in {}",
            state.display()
        );
    }
    let token_file = state.join("join-token");
    if !token_file.exists() {
        pki::write_file(&token_file, &random_token(), true)?;
    }

    // The downstream: the operator's, or a built-in sink.
    let sink_stats = SinkHandle::new();
    let downstream = match a.downstream {
        Some(d) => d,
        None => {
            let listener = TcpListener::bind("127.0.0.1:0")
                .await
                .context("cannot start the built-in sink")?;
            let addr = listener.local_addr()?;
            let config = SinkConfig {
                ack_delay: a.sink_ack_delay,
                ..Default::default()
            };
            let stats = sink_stats.clone();
            tokio::spawn(async move {
                if let Err(e) =
                    bench::run_sink(listener, config, stats, std::future::pending()).await
                {
                    tracing::error!(error = %e, "built-in sink failed");
                }
            });
            addr
        }
    };

    // The controller listens before the minion config is written, so a port
    // 0 can be resolved and minions are told the real one; the controller
    // serves on this very listener (never bound twice).
    let listener = TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    let controller_addr = listener.local_addr()?;
    let controller_url = format!("https://{controller_addr}");

    write(
        &state.join("minion.toml"),
        &minion_toml(&a, &controller_url, downstream)?,
    )?;
    MinionConfig::load(&state.join("minion.toml"))
        .context("the generated minion config is invalid")?;

    let controller_text = controller_toml(&a, controller_addr, schedule_tables)?;
    let controller_path = state.join("controller.toml");
    write(&controller_path, &controller_text)?;
    let config = ControllerConfig::load(&controller_path).map_err(|e| {
        anyhow!(
            "invalid configuration: {}",
            gru_controller::reconcile::error_chain(&e)
        )
    })?;

    let client = ClientConfig {
        controller: controller_url.clone(),
        ca_file: "ca.pem".into(),
        cert_file: "admin.pem".into(),
        key_file: "admin.key".into(),
        server_name: pki::SERVER_NAME.to_owned(),
    };
    let client_path = state.join("client.toml");
    write(&client_path, &toml::to_string(&client)?)?;

    let load = a.load.map(|rate| (rate, a.load_connections));
    let state_for_ready = state.clone();
    let ready = Box::new(
        move |built: &[BuiltFleet],
              addr: SocketAddr,
              metrics: Option<SocketAddr>|
              -> anyhow::Result<()> {
            let lb = built
                .iter()
                .find_map(|b| b.local.as_ref())
                .map(|l| l.load_balancer.local_addr())
                .context("the local fleet has no load balancer")?;
            let info = DevInfo {
                controller: format!("https://{addr}"),
                metrics: metrics.map(|m| format!("http://{m}/metrics")),
                load_balancer: lb,
                downstream,
                client_config: state_for_ready.join("client.toml"),
                state_dir: state_for_ready.clone(),
                pid: std::process::id(),
            };
            write(
                &state_for_ready.join("dev.json"),
                &serde_json::to_string_pretty(&info)?,
            )?;
            banner(&info);
            if let Some((rate, connections)) = load {
                start_load(lb, rate, connections);
            }
            Ok(())
        },
    ) as OnReady;

    let result = serve(config, Some(ready), Some(listener)).await;
    let _ = std::fs::remove_file(state.join("dev.json"));
    if a.downstream.is_none() {
        eprintln!("built-in sink received {} messages", sink_stats.received());
    }
    result
}

/// The config `gru dev`'s local minions run with. Its paths are relative:
/// it lives in the state directory beside the CA and the join token.
fn minion_toml(
    a: &DevArgs,
    controller_url: &str,
    downstream: SocketAddr,
) -> anyhow::Result<String> {
    let file = MinionFile {
        controller: controller_url.to_owned(),
        server_name: None,
        ca_file: "ca.pem".to_owned(),
        fleet: LOCAL_FLEET.to_owned(),
        join_token_file: Some("join-token".to_owned()),
        state_dir: None,
        stop_grace: None,
        metrics_listen: (!a.no_metrics).then(|| "127.0.0.1:0".to_owned()),
        engine: MinionEngine {
            kind: None,
            listen: "127.0.0.1:0".to_owned(),
            downstream: downstream.to_string(),
            max_connection_age: humantime::format_duration(a.max_connection_age).to_string(),
        },
        aws: None,
    };
    let header = "\
Written by `gru dev`; each local minion runs with it.
deploy/minion.example.toml documents the keys; paths are relative to this file.";
    config_files::to_toml(header, &file).context("cannot write the minion config")
}

/// The config `gru dev` runs the controller with (`gru controller --config`
/// takes the same file): one local fleet, with the `[[fleet.schedule]]`
/// tables of the `--schedules` file (its path and [`schedules`]) if any.
/// Its paths are relative: the store and the minions' logs live in the
/// state directory beside it.
fn controller_toml(
    a: &DevArgs,
    listen: SocketAddr,
    schedules: Option<(&Path, Vec<toml::Table>)>,
) -> anyhow::Result<String> {
    let mut header = "\
Written by `gru dev`; `gru controller --config` takes the same file.
deploy/controller.example.toml documents the keys; paths are relative to this
file, and state_dir = \".\" keeps the store (minions, drains, pins, events)
beside it."
        .to_owned();
    let schedule = match schedules {
        Some((path, tables)) => {
            // {:?}: a path is any bytes, a comment is one line.
            header.push_str(&format!(
                "\nThe [[fleet.schedule]] tables are from {:?}.",
                path.display().to_string()
            ));
            tables
        }
        None => Vec::new(),
    };
    let file = ControllerFile {
        listen,
        metrics_listen: (!a.no_metrics).then_some(a.metrics_listen),
        join_token_file: "join-token".to_owned(),
        state_dir: ".".to_owned(),
        tls: ControllerTls {
            cert: "controller.pem".to_owned(),
            key: "controller.key".to_owned(),
            client_ca: "ca.pem".to_owned(),
        },
        fleet: vec![LocalFleet {
            name: LOCAL_FLEET.to_owned(),
            provider: "local",
            min: a.min,
            max: a.max,
            target_queue_per_minion: a.target_queue,
            scale_in_stabilization: a.scale_in_stabilization,
            scale_in_cooldown: a.scale_in_cooldown,
            schedule,
            local: LocalProvider {
                listen: a.lb_listen,
                minion_config: "minion.toml".to_owned(),
                deregistration_delay: a.deregistration_delay,
                log_dir: "minions".to_owned(),
            },
            rebalance: a
                .no_rebalance
                .then_some(config_files::Rebalance { enabled: false }),
        }],
    };
    config_files::to_toml(&header, &file).context("cannot write the controller config")
}

/// A `--schedules` file: `[[fleet.schedule]]` tables and nothing else.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SchedulesFile {
    #[serde(default)]
    fleet: SchedulesFleet,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SchedulesFleet {
    #[serde(default)]
    schedule: Vec<toml::Table>,
}

/// The `[[fleet.schedule]]` tables of a `--schedules` file (`text`, read
/// from `path`), which go into the local fleet of the controller config.
///
/// Parsed and merged, not appended as text: the generated file is then one
/// serialization and always well formed, the tables land in the local fleet
/// however the file spells them (`[[fleet.schedule]]`, `[fleet]` with
/// `schedule = [..]`), and anything else in the file (a `[[fleet]]`, a key
/// before the first table, which appended text would slip into
/// `[fleet.local]`) is refused here with this file's line and column. The
/// tables' contents are checked when the controller config is loaded. Their
/// comments stay in the operator's file, which the generated header names,
/// and the toml crate writes their keys in sorted order.
fn schedules(path: &Path, text: &str) -> anyhow::Result<Vec<toml::Table>> {
    let file: SchedulesFile = toml::from_str(text).with_context(|| {
        format!(
            "invalid schedules file {} (it holds [[fleet.schedule]] tables only)",
            path.display()
        )
    })?;
    Ok(file.fleet.schedule)
}

fn write(path: &Path, contents: &str) -> anyhow::Result<()> {
    pki::write_file(path, contents, false)
        .map_err(|e| anyhow!(gru_controller::reconcile::error_chain(&e)))
}

fn banner(info: &DevInfo) {
    let default_client = client::default_state_dir().join("client.toml");
    let env_hint = if info.client_config == default_client {
        String::new()
    } else {
        format!("  export GRU_CONFIG={}\n", info.client_config.display())
    };
    if let Some(m) = &info.metrics {
        // One line, for people and for scripts that look for it.
        let sd = m.replace("/metrics", "/sd/minions");
        eprintln!("metrics: {m} (minions: {sd})");
    }
    eprintln!(
        "\ngru dev is running (Ctrl-C stops it and every minion)\n\
         \n  controller     {}\n  load balancer  {}  (send HL7 over MLLP here)\n  downstream     {}\n  state          {}\n\
         \nIn another terminal:\n{env_hint}  gru fleet ls\n  gru minion ls\n  gru bench drive --target {} --rate 200 --duration 30s\n  gru scale local 3 --wait\n  gru events -f\n",
        info.controller,
        info.load_balancer,
        info.downstream,
        info.state_dir.display(),
        info.load_balancer,
    );
}

fn start_load(target: SocketAddr, rate: f64, connections: usize) {
    let config = bench::DriveConfig {
        target,
        rate: Some(rate),
        duration: Duration::from_secs(365 * 24 * 3600),
        connections,
        seed: 1,
        message_bytes: bench::DEFAULT_MESSAGE_BYTES,
        reconnect_backoff: bench::DEFAULT_RECONNECT_BACKOFF,
        ..Default::default()
    };
    let live = bench::DriveHandle::new();
    tokio::spawn(async move {
        if let Err(e) = bench::run_drive(config, live, interrupted()).await {
            tracing::error!(error = %e, "built-in load failed");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use gru_controller::config::ProviderConfig;
    use gru_minion::config::EngineSection;

    /// `gru dev` with these arguments.
    fn args(args: &[&str]) -> DevArgs {
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            dev: DevArgs,
        }
        Cli::try_parse_from(std::iter::once("dev").chain(args.iter().copied()))
            .unwrap()
            .dev
    }

    /// A state directory that TOML would have to escape. gru dev's configs
    /// name their files relative to it, so its name is never in them.
    const STATE: &str = r#"/tmp/gru's "dev" \state"#;

    #[test]
    fn the_configs_load_in_a_state_directory_with_quotes_in_its_name() {
        let a = args(&[
            "--min",
            "2",
            "--max",
            "7",
            "--scale-in-stabilization",
            "90s",
            "--lb-listen",
            "127.0.0.1:2599",
            "--max-connection-age",
            "2m",
        ]);
        let state = Path::new(STATE);
        let listen: SocketAddr = "127.0.0.1:7171".parse().unwrap();
        let downstream: SocketAddr = "127.0.0.1:2576".parse().unwrap();

        let text = controller_toml(&a, listen, None).unwrap();
        assert!(text.starts_with("# Written by `gru dev`"), "{text}");
        let c = ControllerConfig::parse(&state.join("controller.toml"), &text).unwrap();
        assert_eq!(c.listen, listen);
        assert_eq!(c.metrics_listen, Some(a.metrics_listen));
        assert_eq!(c.state_dir, state);
        assert_eq!(c.join_token_file, Some(state.join("join-token")));
        assert_eq!(c.tls.cert, state.join("controller.pem"));
        assert_eq!(c.tls.client_ca, state.join("ca.pem"));
        let [f] = &c.fleets[..] else {
            panic!("one fleet: {text}")
        };
        assert_eq!(f.name, LOCAL_FLEET);
        assert_eq!((f.bounds().min, f.bounds().max), (2, 7));
        let behaviour = f.policy.behaviour();
        assert_eq!(behaviour.scale_in_stabilization, Duration::from_secs(90));
        assert_eq!(behaviour.scale_in_cooldown, Duration::ZERO);
        assert!(f.policy.schedules().is_empty());
        let ProviderConfig::Local(l) = &f.provider else {
            panic!("a local fleet: {text}")
        };
        assert_eq!(l.listen, a.lb_listen);
        assert_eq!(l.minion_config, state.join("minion.toml"));
        assert_eq!(l.deregistration_delay, Duration::from_secs(300));
        assert_eq!(l.log_dir.as_deref(), Some(&*state.join("minions")));

        let text = minion_toml(&a, &format!("https://{listen}"), downstream).unwrap();
        let m = MinionConfig::parse(&state.join("minion.toml"), &text).unwrap();
        assert_eq!(m.controller, format!("https://{listen}"));
        assert_eq!(m.fleet, LOCAL_FLEET);
        assert_eq!(m.ca_file, state.join("ca.pem"));
        assert_eq!(m.join_token_file, Some(state.join("join-token")));
        assert!(m.metrics_listen.is_some());
        assert!(m.aws.is_none());
        let EngineSection::Reference(engine) = &m.engine else {
            panic!("the reference engine: {text}")
        };
        assert_eq!(engine.downstream, Some(downstream));
        assert_eq!(engine.max_connection_age, Duration::from_secs(120));
    }

    #[test]
    fn no_metrics_leaves_metrics_off_in_both() {
        let a = args(&["--no-metrics"]);
        let listen = "127.0.0.1:7070".parse().unwrap();
        let text = controller_toml(&a, listen, None).unwrap();
        let c = ControllerConfig::parse(Path::new("/x/controller.toml"), &text).unwrap();
        assert_eq!(c.metrics_listen, None);
        let text = minion_toml(&a, "https://127.0.0.1:7070", listen).unwrap();
        let m = MinionConfig::parse(Path::new("/x/minion.toml"), &text).unwrap();
        assert_eq!(m.metrics_listen, None);
    }

    #[test]
    fn rebalancing_is_on_unless_turned_off() {
        let listen = "127.0.0.1:7070".parse().unwrap();
        for (flags, on) in [(&[][..], true), (&["--no-rebalance"][..], false)] {
            let text = controller_toml(&args(flags), listen, None).unwrap();
            let c = ControllerConfig::parse(Path::new("/x/controller.toml"), &text).unwrap();
            assert_eq!(c.fleets[0].rebalance.is_some(), on, "{flags:?}:\n{text}");
        }
    }

    #[test]
    fn schedules_go_into_the_local_fleet_with_quotes_backslashes_and_newlines() {
        let text = r#"
# Quiet nights.
[[fleet.schedule]]
name = "night \"shift\" C:\\gru\nsecond line"
timezone = "Europe/Berlin"
days = "*"
from = "19:00"
to = "07:00"
max = 1

[[fleet.schedule]]
name = 'weekend'
timezone = "Europe/Berlin"
days = "sat,sun"
from = "00:00"
to = "00:00"
max = 2
priority = 10
"#;
        // A path on two lines stays in its comment.
        let path = Path::new("/tmp/my \"windows\"\nlisten = 1.toml");
        let tables = schedules(path, text).unwrap();
        let a = args(&[]);
        let out =
            controller_toml(&a, "127.0.0.1:7070".parse().unwrap(), Some((path, tables))).unwrap();
        assert!(
            out.contains(
                "\n# The [[fleet.schedule]] tables are from \"/tmp/my \\\"windows\\\"\\nlisten = 1.toml\".\n"
            ),
            "{out}"
        );
        let c = ControllerConfig::parse(Path::new("/tmp/controller.toml"), &out).unwrap();
        let names: Vec<&str> = c.fleets[0]
            .policy
            .schedules()
            .iter()
            .map(|s| s.name())
            .collect();
        assert_eq!(
            names,
            ["night \"shift\" C:\\gru\nsecond line", "weekend"],
            "{out}"
        );
        assert_eq!(c.fleets[0].policy.schedules()[1].max(), Some(2));
    }

    #[test]
    fn schedules_may_be_written_as_an_array() {
        let text = "[fleet]\nschedule = [{ name = \"all\", timezone = \"UTC\", days = \"*\", from = \"00:00\", to = \"00:00\", min = 2 }]\n";
        let tables = schedules(Path::new("/tmp/s.toml"), text).unwrap();
        let out = controller_toml(
            &args(&["--max", "3"]),
            "127.0.0.1:7070".parse().unwrap(),
            Some((Path::new("/tmp/s.toml"), tables)),
        )
        .unwrap();
        let c = ControllerConfig::parse(Path::new("/tmp/controller.toml"), &out).unwrap();
        assert_eq!(c.fleets[0].policy.schedules()[0].min(), Some(2));
    }

    #[test]
    fn a_schedules_file_holds_schedules_only() {
        let path = Path::new("/tmp/s.toml");
        assert!(schedules(path, "# none yet\n").unwrap().is_empty());
        for (text, cause) in [
            // Appended as text, this key would have landed in [fleet.local].
            ("log_dir = \"/\"\n", "unknown field `log_dir`"),
            ("[[fleet]]\nname = \"other\"\n", "line 1"),
            ("[fleet.local]\nlog_dir = \"/\"\n", "unknown field `local`"),
            ("[tls]\ncert = \"x.pem\"\n", "unknown field `tls`"),
            ("[[fleet.schedule]\n", "line 1"),
        ] {
            let e = format!("{:#}", schedules(path, text).unwrap_err());
            assert!(
                e.starts_with(
                    "invalid schedules file /tmp/s.toml (it holds [[fleet.schedule]] tables only): "
                ),
                "{e}"
            );
            assert!(e.contains(cause), "{text:?}: {e}");
        }
    }
}
