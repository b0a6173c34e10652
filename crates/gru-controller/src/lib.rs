//! The gru controller: the persistent service that tracks minions over gRPC,
//! sizes each fleet and takes minions out of service without losing work.
//!
//! Start reading at [`run`]: it builds the [`Controller`] (shared state),
//! spawns one reconcile loop per fleet ([`reconcile`]) and serves the gRPC
//! API ([`server`]). The registry ([`registry`]) holds what the controller
//! knows; every state change goes through `gru_core::step`.
//!
//! Invariants: the controller is the only writer of a group's desired
//! capacity; it scales in only by terminating a Drained minion with the
//! desired capacity decremented in the same call; no lock is held across an
//! `.await`.

pub mod access;
pub mod admin_api;
pub mod config;
pub mod front_door;
pub mod ha;
pub mod identity;
pub mod metrics;
pub mod minion_api;
pub mod pki;
pub mod reconcile;
pub mod registry;
pub mod server;
pub mod store;

use std::future::Future;
use std::sync::Arc;

pub use config::{ConfigError, ControllerConfig};
pub use reconcile::{Controller, FleetRuntime};
pub use server::ServeError;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The controller's clock: tokio's, read as a std `Instant`, so a test that
/// pauses tokio's time (`tokio::time::pause`, `advance`) moves every age
/// the controller measures. Read once per reconcile pass and once per
/// incoming message.
pub fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// How long a stopping controller lets in-flight calls finish.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// The one production entry point, for `gru controller` and `gru dev`:
/// reads the minions' join token, resumes the controller from `store` over
/// `fleets`, and runs it on `listener` until `shutdown` resolves; with
/// `metrics`, serves Prometheus metrics there too (see docs/metrics.md);
/// with `leadership`, as the leader on that lease (see [`ha`]).
///
/// The caller opens the store first (a controller that cannot trust its
/// memory must start nothing, not even a local minion) and builds the
/// fleets' providers: gru-controller knows them only by gru-cloud's traits.
pub async fn serve(
    config: ControllerConfig,
    store: Arc<dyn store::Store>,
    fleets: Vec<FleetRuntime>,
    listener: TcpListener,
    metrics: Option<TcpListener>,
    leadership: Option<Arc<dyn ha::Leadership>>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    // Empty when every fleet joins with identity documents: then no token
    // is accepted.
    let token = match &config.join_token_file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|source| ServeError::JoinToken {
                path: path.clone(),
                source,
            })?
            .trim()
            .to_owned(),
        None => String::new(),
    };
    let controller = Controller::new(config, fleets, token, store).map_err(ServeError::Store)?;
    if let Some(l) = leadership {
        controller.lead_under(l);
    }
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(listen = %addr, "controller serving");
    }
    let (stop_metrics, metrics_stopped) = watch::channel(false);
    if let Some(metrics) = metrics {
        if let Ok(addr) = metrics.local_addr() {
            tracing::info!(listen = %addr, "metrics served at http://{addr}/metrics");
        }
        let site = controller.metrics_site();
        let mut stopped = metrics_stopped;
        tokio::spawn(gru_proto::metrics::serve(metrics, site, async move {
            let _ = stopped.wait_for(|s| *s).await;
        }));
    }
    let result = run(controller, listener, shutdown).await;
    let _ = stop_metrics.send(true);
    result
}

/// Runs the controller: reconcile loops and the gRPC server on `listener`,
/// until `shutdown` resolves.
pub async fn run(
    controller: Arc<Controller>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut loops = Vec::new();
    for fleet in controller
        .fleets()
        .map(|f| f.name().to_owned())
        .collect::<Vec<_>>()
    {
        let mut stop = stop_rx.clone();
        let c = controller.clone();
        loops.push(tokio::spawn(async move {
            c.run_fleet(fleet, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
        }));
    }
    {
        let mut stop = stop_rx.clone();
        let c = controller.clone();
        loops.push(tokio::spawn(async move {
            c.prune_events(async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
        }));
    }
    let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = server::serve(listener, controller, async {
        let _ = server_stopped.await;
    });
    tokio::pin!(server);
    tokio::pin!(shutdown);
    let result = tokio::select! {
        r = &mut server => r,
        _ = &mut shutdown => {
            let _ = stop_server.send(());
            // Minion Sessions are long-lived streams that never end by
            // themselves: give in-flight calls a moment, then drop the rest.
            tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await.unwrap_or(Ok(()))
        }
    };
    let _ = stop_tx.send(true);
    for l in loops {
        let _ = l.await;
    }
    result
}
