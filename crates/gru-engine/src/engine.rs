//! The reference engine: MLLP in, routes, queues, MLLP out.
//!
//! The promise is "no accepted message is lost". With the default
//! [`AckMode::AfterDelivery`] a sender gets AA only after every destination
//! ACKed the message, AE when delivery failed, and nothing at all when the
//! engine stops with the message still queued — then the sender resends it
//! elsewhere. With [`AckMode::AfterEnqueue`] the AA comes once the message is
//! queued; only with a durable queue (`queue_dir`, see [`crate::wal`]) does
//! that survive a crash. [`AckMode::None`] answers nothing.
//!
//! Each inbound message goes down every route ([`crate::routes`]): routes
//! with a transform edit their own copy ([`crate::transform`]), the others
//! forward the bytes as received (the MSH-only fast path). Each destination
//! has its own queue of `Delivery`s; a `Tracker` per inbound message counts
//! the destinations still to go and decides the outcome.
//!
//! Three kinds of task share one `Shared` state:
//! - the accept loop (`accept_loop`) spawns one `connection` task per
//!   sender, or drops the socket at once while draining;
//! - each connection reads one frame, dispatches it and (after-delivery)
//!   waits for its outcome before writing the ACK and reading the next frame
//!   (MLLP is one message at a time);
//! - `forwarder` tasks, `forwarders` per destination, each hold one
//!   downstream connection and work that destination's queue, retrying with
//!   backoff up to `max_attempts`.
//!
//! Connections close only at message boundaries: on drain, and once they
//! reach their jittered `max_connection_age` (see DESIGN.md, "Long-lived
//! connections and scale-out").

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::{FutureExt, SinkExt, StreamExt};
use rand::Rng;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::hl7::{self, AckCode, Msh};
use crate::mllp::{DEFAULT_MAX_FRAME_BYTES, MllpCodec, MllpError};
pub use crate::routes::{AckMode, Route};
use crate::transform::{Transform, TransformError};
use crate::wal::{self, Wal};

/// Connections close at a message boundary after this age (jittered up to
/// twice as long), so load spreads onto new minions within minutes.
pub const DEFAULT_MAX_CONNECTION_AGE: Duration = Duration::from_secs(5 * 60);
/// Downstream connections working each destination's queue.
pub const DEFAULT_FORWARDERS: usize = 4;
/// How long to wait for a downstream connect or ACK.
pub const DEFAULT_DOWNSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// Delivery attempts before a message is reported failed (AE upstream).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// Inbound messages held (queued or in flight to any destination) before
/// connections stop reading: back-pressure for after-enqueue and no-ACK
/// senders, whose next message does not wait for delivery.
pub const DEFAULT_MAX_QUEUED_MESSAGES: usize = 10_000;
/// Default listen address: the conventional MLLP port.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 2575);
/// Default downstream: a local system on the next port.
pub const DEFAULT_DOWNSTREAM: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 2576);

/// First delay between delivery attempts and downstream reconnects; doubles
/// up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long a closing connection waits for the rest of a frame it has begun
/// to receive before giving up on it.
const PARTIAL_FRAME_GRACE: Duration = Duration::from_secs(30);
/// Pause after a failed `accept` (e.g. out of file descriptors).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// How long a [`EngineHandle::shed`] request stands: connections that
/// reach a message boundary within it close; what is left is forgotten
/// (the senders it was meant for may have gone by themselves).
pub const SHED_WINDOW: Duration = Duration::from_secs(10);

/// Engine settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// Where senders (through the load balancer) connect.
    pub listen: SocketAddr,
    /// The system messages are passed on to when `routes` is empty.
    pub downstream: SocketAddr,
    /// Largest inbound payload; a larger frame closes its connection.
    pub max_frame_bytes: usize,
    /// Close each inbound connection at a message boundary after a random
    /// age in `[max_connection_age, 2 * max_connection_age]`. ZERO = never.
    pub max_connection_age: Duration,
    /// Downstream connections working each destination's queue.
    pub forwarders: usize,
    /// Limit on a downstream connect and on waiting for a downstream ACK.
    pub downstream_timeout: Duration,
    /// Delivery attempts per destination before a message is reported failed.
    pub max_attempts: u32,
    /// Where each message goes. Empty (the default) = one route, no
    /// transform, to `downstream`: plain pass-through (T1).
    pub routes: Vec<Route>,
    /// When senders get their ACK.
    pub ack_mode: AckMode,
    /// Directory of the durable queue; `None` = in memory only. With it,
    /// every message is logged (fsync batched) before it is queued, and
    /// replayed on the next start until every destination ACKed it.
    pub queue_dir: Option<PathBuf>,
    /// Durable queue segment size before rolling over.
    pub queue_segment_bytes: u64,
    /// Inbound messages held before connections stop reading (see
    /// [`DEFAULT_MAX_QUEUED_MESSAGES`]). Messages replayed from the durable
    /// queue on start do not count against it.
    pub max_queued_messages: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN,
            downstream: DEFAULT_DOWNSTREAM,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            max_connection_age: DEFAULT_MAX_CONNECTION_AGE,
            forwarders: DEFAULT_FORWARDERS,
            downstream_timeout: DEFAULT_DOWNSTREAM_TIMEOUT,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            routes: Vec::new(),
            ack_mode: AckMode::default(),
            queue_dir: None,
            queue_segment_bytes: wal::DEFAULT_SEGMENT_BYTES,
            max_queued_messages: DEFAULT_MAX_QUEUED_MESSAGES,
        }
    }
}

impl EngineConfig {
    /// The routes in effect: `routes`, or the implicit pass-through to
    /// `downstream`.
    pub fn effective_routes(&self) -> Vec<Route> {
        if self.routes.is_empty() {
            vec![Route::pass_through("default", vec![self.downstream])]
        } else {
            self.routes.clone()
        }
    }
}

/// Errors starting the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The configuration cannot work.
    #[error("invalid engine config: {field} {reason}")]
    InvalidConfig {
        /// The offending field.
        field: &'static str,
        /// What was expected.
        reason: &'static str,
    },
    /// A route's transform cannot work.
    #[error("invalid transform on route {route}")]
    InvalidTransform {
        /// The route's name.
        route: String,
        /// Why.
        #[source]
        source: TransformError,
    },
    /// The listen address could not be bound.
    #[error("failed to listen on {addr}")]
    Bind {
        /// The address from the config.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The durable queue could not be opened or replayed.
    #[error("failed to open the durable queue in {dir}")]
    Queue {
        /// `queue_dir`.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A snapshot of the engine's counters, as the minion reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStatus {
    /// Deliveries (one per message and destination) queued and not yet
    /// taken by a forwarder.
    pub queue_depth: u64,
    /// Deliveries taken by a forwarder and not yet ACKed downstream (or
    /// given up).
    pub in_flight: u64,
    /// Messages every destination ACKed, since start.
    pub processed: u64,
    /// Messages at least one destination gave up on after `max_attempts`,
    /// since start (answered AE upstream in after-delivery mode; kept in the
    /// durable queue for the next start when there is one).
    pub failed: u64,
    /// Live inbound connections.
    pub open_connections: u64,
    /// The listener is running.
    pub healthy: bool,
    /// Intake is stopping (see [`EngineHandle::drain`]).
    pub draining: bool,
    /// Draining and nothing left: no queue, nothing in flight, no connections.
    pub drained: bool,
}

/// A running engine. Cheap to clone; all clones control the same engine.
#[derive(Clone)]
pub struct EngineHandle {
    shared: Arc<Shared>,
}

/// What connections, forwarders and the handle share.
struct Shared {
    local_addr: SocketAddr,
    ack_mode: AckMode,
    routes: Vec<PlannedRoute>,
    destinations: Vec<Arc<Destination>>,
    wal: Option<Wal>,
    /// Next durable queue id.
    next_message_id: AtomicU64,
    /// One permit per inbound message held; see `max_queued_messages`.
    capacity: Arc<Semaphore>,
    queue_depth: AtomicU64,
    in_flight: AtomicU64,
    processed: AtomicU64,
    failed: AtomicU64,
    open_connections: AtomicU64,
    /// Last byte of a message read to its ACK written.
    ack_latency: crate::latency::Latency,
    healthy: AtomicBool,
    /// Whether intake is draining; connections watch it to close when idle.
    draining: watch::Sender<bool>,
    /// Connections still to close for a shed request, and until when.
    shed: std::sync::Mutex<(u64, Instant)>,
    /// Bumped on each shed request, to wake idle connections.
    shedding: watch::Sender<u64>,
    /// Bumped whenever a counter that `drained` depends on goes down.
    changed: watch::Sender<u64>,
    /// Stops every task, queued messages or not.
    stop: CancellationToken,
    /// Source of ACK control ids (MSH-10 of the ACKs we send).
    ack_ids: AtomicU64,
    /// Accept loop and forwarders, awaited by `shutdown`.
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

/// A route with its destinations resolved to indexes into
/// `Shared::destinations` (stable for a given config, so the durable queue
/// can record which ones are done).
struct PlannedRoute {
    name: String,
    transform: Option<Transform>,
    destinations: Vec<u32>,
}

/// One outbound MLLP destination and its queue.
struct Destination {
    index: u32,
    addr: SocketAddr,
    tx: mpsc::UnboundedSender<Delivery>,
    rx: Mutex<mpsc::UnboundedReceiver<Delivery>>,
}

impl Shared {
    fn status(&self) -> EngineStatus {
        let queue_depth = self.queue_depth.load(Ordering::SeqCst);
        let in_flight = self.in_flight.load(Ordering::SeqCst);
        let open_connections = self.open_connections.load(Ordering::SeqCst);
        let draining = *self.draining.borrow();
        EngineStatus {
            queue_depth,
            in_flight,
            processed: self.processed.load(Ordering::SeqCst),
            failed: self.failed.load(Ordering::SeqCst),
            open_connections,
            healthy: self.healthy.load(Ordering::SeqCst),
            draining,
            drained: draining && queue_depth == 0 && in_flight == 0 && open_connections == 0,
        }
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Takes one connection of a standing shed request: the caller closes.
    fn take_shed(&self) -> bool {
        let mut shed = lock(&self.shed);
        if shed.0 == 0 || Instant::now() >= shed.1 {
            return false;
        }
        shed.0 -= 1;
        true
    }

    fn next_ack_id(&self) -> String {
        format!("GRU{}", self.ack_ids.fetch_add(1, Ordering::Relaxed) + 1)
    }
}

/// One message for one destination.
struct Delivery {
    payload: Bytes,
    /// MSH-10 of `payload` (after the route's transform).
    control_id: String,
    tracker: Arc<Tracker>,
}

/// One inbound message across all its deliveries.
struct Tracker {
    /// Its durable queue id, if logged.
    wal_id: Option<u64>,
    /// Inbound MSH-10, for logs.
    control_id: String,
    remaining: AtomicUsize,
    failed: AtomicBool,
    /// Who waits for the outcome (after-delivery mode).
    outcome: std::sync::Mutex<Option<oneshot::Sender<Outcome>>>,
    /// Released when the last delivery drops this tracker.
    _permit: Option<OwnedSemaphorePermit>,
}

/// How delivery of a message ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Every destination ACKed it: answer AA.
    Delivered,
    /// At least one destination gave up after `max_attempts`: answer AE.
    Failed,
}

/// Binds the listener, opens and replays the durable queue, spawns the
/// accept loop and forwarders, and returns.
pub async fn start(config: EngineConfig) -> Result<EngineHandle, EngineError> {
    validate(&config)?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| EngineError::Bind {
            addr: config.listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| EngineError::Bind {
        addr: config.listen,
        source,
    })?;
    let mut destinations = Vec::new();
    let mut routes = Vec::new();
    for route in config.effective_routes() {
        let mut indexes = Vec::new();
        for addr in &route.destinations {
            let index = destinations.len() as u32;
            let (tx, rx) = mpsc::unbounded_channel();
            destinations.push(Arc::new(Destination {
                index,
                addr: *addr,
                tx,
                rx: Mutex::new(rx),
            }));
            indexes.push(index);
        }
        routes.push(PlannedRoute {
            transform: route.active_transform().cloned(),
            name: route.name,
            destinations: indexes,
        });
    }
    let (wal, pending, next_id) = match &config.queue_dir {
        None => (None, Vec::new(), 1),
        Some(dir) => {
            let dir2 = dir.clone();
            let segment_bytes = config.queue_segment_bytes;
            let opened = tokio::task::spawn_blocking(move || wal::Wal::open(&dir2, segment_bytes))
                .await
                .map_err(|e| EngineError::Queue {
                    dir: dir.clone(),
                    source: std::io::Error::other(e),
                })?
                .map_err(|source| EngineError::Queue {
                    dir: dir.clone(),
                    source,
                })?;
            (Some(opened.wal), opened.pending, opened.next_id)
        }
    };
    let shared = Arc::new(Shared {
        local_addr,
        ack_mode: config.ack_mode,
        routes,
        destinations,
        wal,
        next_message_id: AtomicU64::new(next_id),
        capacity: Arc::new(Semaphore::new(config.max_queued_messages)),
        queue_depth: AtomicU64::new(0),
        in_flight: AtomicU64::new(0),
        processed: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        open_connections: AtomicU64::new(0),
        ack_latency: Default::default(),
        healthy: AtomicBool::new(true),
        draining: watch::Sender::new(false),
        shed: std::sync::Mutex::new((0, Instant::now())),
        shedding: watch::Sender::new(0),
        changed: watch::Sender::new(0),
        stop: CancellationToken::new(),
        ack_ids: AtomicU64::new(0),
        tasks: std::sync::Mutex::new(Vec::new()),
    });
    let replayed = pending.len();
    for p in pending {
        let control_id = Msh::parse(&p.payload)
            .map(|m| m.control_id)
            .unwrap_or_default();
        dispatch(
            &shared,
            &control_id,
            &p.payload,
            Some(p.id),
            &p.done,
            None,
            None,
        );
    }
    let config = Arc::new(config);
    let mut tasks = Vec::new();
    for dest in &shared.destinations {
        for id in 0..config.forwarders {
            let span = info_span!("forwarder", id, destination = %dest.addr);
            tasks.push(tokio::spawn(
                forwarder(shared.clone(), config.clone(), dest.clone()).instrument(span),
            ));
        }
    }
    let span = info_span!("engine", listen = %local_addr);
    tasks.push(tokio::spawn(
        accept_loop(listener, shared.clone(), config.clone()).instrument(span),
    ));
    *lock(&shared.tasks) = tasks;
    info!(
        listen = %local_addr,
        routes = shared.routes.len(),
        destinations = shared.destinations.len(),
        ack_mode = %config.ack_mode,
        durable = config.queue_dir.is_some(),
        replayed,
        "engine started"
    );
    Ok(EngineHandle { shared })
}

fn validate(config: &EngineConfig) -> Result<(), EngineError> {
    let invalid = |field, reason| Err(EngineError::InvalidConfig { field, reason });
    if config.forwarders == 0 {
        return invalid("forwarders", "must be at least 1");
    }
    if config.max_attempts == 0 {
        return invalid("max_attempts", "must be at least 1");
    }
    if config.max_frame_bytes == 0 {
        return invalid("max_frame_bytes", "must be at least 1");
    }
    if config.downstream_timeout.is_zero() {
        return invalid("downstream_timeout", "must be more than zero");
    }
    if config.max_queued_messages == 0 {
        return invalid("max_queued_messages", "must be at least 1");
    }
    if config.queue_segment_bytes == 0 {
        return invalid("queue_segment_bytes", "must be at least 1");
    }
    for route in &config.routes {
        if route.destinations.is_empty() {
            return invalid("routes", "each route needs at least one destination");
        }
        if let Some(t) = &route.transform {
            t.validate()
                .map_err(|source| EngineError::InvalidTransform {
                    route: route.name.clone(),
                    source,
                })?;
        }
    }
    Ok(())
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave their values inconsistent.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl EngineHandle {
    /// The bound listen address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// The current counters.
    pub fn status(&self) -> EngineStatus {
        self.shared.status()
    }

    /// How long ACKs took since the engine started.
    pub fn ack_latency(&self) -> crate::latency::LatencySnapshot {
        self.shared.ack_latency.snapshot()
    }

    /// Starts draining: idle connections close now, busy ones after their
    /// current message's ACK, new connections are closed on arrival, and the
    /// queues keep flushing downstream. Idempotent.
    pub fn drain(&self) {
        let was = self.shared.draining.send_replace(true);
        if !was {
            info!(listen = %self.shared.local_addr, "draining");
        }
        self.shared.bump();
    }

    /// Asks `count` inbound connections to close at their next message
    /// boundary (idle ones at once, busy ones right after their ACK), so
    /// their senders reconnect through the load balancer, onto another
    /// minion. Replaces any earlier request; what no connection took within
    /// [`SHED_WINDOW`] is forgotten. Returns how many will close: at most
    /// the connections open now.
    pub fn shed(&self, count: u64) -> u64 {
        let open = self.shared.open_connections.load(Ordering::SeqCst);
        let n = count.min(open);
        *lock(&self.shared.shed) = (n, Instant::now() + SHED_WINDOW);
        if n > 0 {
            info!(count = n, open, "shedding connections");
            self.shared.shedding.send_modify(|v| *v = v.wrapping_add(1));
        }
        n
    }

    /// Stops draining: new connections are served again.
    pub fn resume(&self) {
        let was = self.shared.draining.send_replace(false);
        if was {
            info!(listen = %self.shared.local_addr, "resumed");
        }
        self.shared.bump();
    }

    /// Resolves once the engine is draining with no queue (durable or not),
    /// nothing in flight and no open connections.
    pub async fn drained(&self) {
        let mut changed = self.shared.changed.subscribe();
        while !self.shared.status().drained {
            if changed.changed().await.is_err() {
                // Cannot happen while `self` holds the sender; do not spin.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Drains, waits up to `grace` for [`drained`](Self::drained), then stops
    /// every task. Messages still queued in memory get no ACK (after-delivery)
    /// so their senders resend; in the durable queue they wait for the next
    /// start.
    pub async fn shutdown(&self, grace: Duration) {
        self.drain();
        if timeout(grace, self.drained()).await.is_err() {
            let status = self.status();
            warn!(
                queue_depth = status.queue_depth,
                in_flight = status.in_flight,
                open_connections = status.open_connections,
                "shutdown grace elapsed before drained"
            );
        }
        self.shared.stop.cancel();
        self.shared.healthy.store(false, Ordering::SeqCst);
        let tasks = std::mem::take(&mut *lock(&self.shared.tasks));
        for task in tasks {
            if let Err(e) = task.await {
                warn!(error = %e, "engine task ended abnormally");
            }
        }
        // Connection tasks are not tracked; wait for them to close.
        let mut changed = self.shared.changed.subscribe();
        while self.shared.open_connections.load(Ordering::SeqCst) > 0 {
            if changed.changed().await.is_err() {
                break;
            }
        }
        self.close_wal(true).await;
        info!(listen = %self.shared.local_addr, "engine stopped");
    }

    /// Stops everything at once, as if the process died: no drain, tasks
    /// aborted, the durable queue's unsynced buffer dropped. What survives is
    /// what a `kill -9` would leave: every message ACKed in after-enqueue
    /// mode was synced first. Connections see the stop and close without
    /// answering. For crash tests in one process.
    pub async fn abort(&self) {
        self.shared.stop.cancel();
        self.shared.healthy.store(false, Ordering::SeqCst);
        let tasks = std::mem::take(&mut *lock(&self.shared.tasks));
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            let _ = task.await;
        }
        self.close_wal(false).await;
        warn!(listen = %self.shared.local_addr, "engine aborted");
    }

    async fn close_wal(&self, clean: bool) {
        if self.shared.wal.is_none() {
            return;
        }
        let shared = self.shared.clone();
        let closed = tokio::task::spawn_blocking(move || {
            if let Some(wal) = &shared.wal {
                wal.close(clean);
            }
        })
        .await;
        if let Err(e) = closed {
            warn!(error = %e, "closing the durable queue failed");
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, config: Arc<EngineConfig>) {
    loop {
        let accepted = tokio::select! {
            _ = shared.stop.cancelled() => break,
            r = listener.accept() => r,
        };
        let (socket, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "accept failed");
                sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        if shared.is_draining() {
            debug!(peer = %peer, "refused connection while draining");
            drop(socket);
            continue;
        }
        let _ = socket.set_nodelay(true);
        shared.open_connections.fetch_add(1, Ordering::SeqCst);
        let guard = ConnectionGuard(shared.clone());
        let span = info_span!("connection", peer = %peer);
        tokio::spawn(connection(socket, shared.clone(), config.clone(), guard).instrument(span));
    }
    shared.healthy.store(false, Ordering::SeqCst);
}

/// Counts a live inbound connection; dropping it (however the task ends)
/// uncounts it.
struct ConnectionGuard(Arc<Shared>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::SeqCst);
        self.0.bump();
    }
}

/// Why a connection was closed by us or by the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CloseReason {
    Peer,
    Draining,
    MaxAge,
    /// Asked to shed ([`EngineHandle::shed`]).
    Shed,
    Stopped,
    Error,
}

async fn connection(
    socket: TcpStream,
    shared: Arc<Shared>,
    config: Arc<EngineConfig>,
    _guard: ConnectionGuard,
) {
    let mut framed = Framed::new(socket, MllpCodec::new(config.max_frame_bytes));
    let mut draining = shared.draining.subscribe();
    let mut shedding = shared.shedding.subscribe();
    let age_deadline = connection_deadline(config.max_connection_age);
    let mut messages = 0u64;
    let closed = loop {
        let closing = if *draining.borrow_and_update() {
            Some(CloseReason::Draining)
        } else if age_deadline.is_some_and(|d| Instant::now() >= d) {
            Some(CloseReason::MaxAge)
        } else if framed.read_buffer().is_empty()
            && !input_waiting(framed.get_ref())
            && shared.take_shed()
        {
            // Only at a boundary with nothing sent to it yet: a connection
            // with (part of) a message in hand reads it first and asks again
            // after its ACK, so its sender does not have to resend it.
            Some(CloseReason::Shed)
        } else {
            None
        };
        if let Some(reason) = closing {
            // A partly received frame is a message in hand: finish it first.
            if framed.read_buffer().is_empty() {
                break reason;
            }
        }
        let frame = tokio::select! {
            _ = shared.stop.cancelled() => break CloseReason::Stopped,
            frame = framed.next() => frame,
            r = draining.changed(), if closing.is_none() => {
                if r.is_err() {
                    break CloseReason::Stopped;
                }
                continue;
            }
            r = shedding.changed(), if closing.is_none() => {
                if r.is_err() {
                    break CloseReason::Stopped;
                }
                continue;
            }
            _ = sleep_until(age_deadline.unwrap_or_else(Instant::now)),
                if closing.is_none() && age_deadline.is_some() => continue,
            _ = sleep(PARTIAL_FRAME_GRACE), if closing.is_some() => {
                warn!(
                    buffered = framed.read_buffer().len(),
                    "gave up waiting for the rest of a frame while closing"
                );
                break closing.unwrap_or(CloseReason::Stopped);
            }
        };
        let payload = match frame {
            None => break CloseReason::Peer,
            Some(Ok(payload)) => payload,
            Some(Err(MllpError::Truncated { buffered })) => {
                debug!(buffered, "peer closed inside a frame");
                break CloseReason::Peer;
            }
            Some(Err(e)) => {
                warn!(error = %e, "closing connection after a bad frame");
                break CloseReason::Error;
            }
        };
        let received = Instant::now();
        let ack = match Msh::parse(&payload) {
            Err(e) => {
                warn!(error = %e, bytes = payload.len(), "rejecting message without a readable msh");
                // A no-ACK sender reads nothing: an AR would only fill its
                // socket buffer until this connection blocks.
                (shared.ack_mode != AckMode::None)
                    .then(|| hl7::build_reject(&e, &shared.next_ack_id()))
            }
            Ok(msh) => match accept(&shared, &msh, payload).await {
                // The engine is stopping with the message undelivered:
                // no ACK, so the sender resends it elsewhere.
                Accepted::Stopped => break CloseReason::Stopped,
                Accepted::NoAck => None,
                Accepted::Ack(code, text) => {
                    Some(hl7::build_ack(&msh, code, &shared.next_ack_id(), text))
                }
            },
        };
        if let Some(ack) = ack
            && let Err(e) = framed.send(Bytes::from(ack)).await
        {
            warn!(error = %e, "failed to write ack");
            break CloseReason::Error;
        }
        if shared.ack_mode != AckMode::None {
            shared.ack_latency.observe(received.elapsed());
        }
        messages += 1;
    };
    debug!(reason = ?closed, messages, "connection closed");
}

/// Whether the peer has sent bytes not read yet (or closed), without
/// waiting.
fn input_waiting(socket: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    socket.peek(&mut byte).now_or_never().is_some()
}

/// What to answer a sender.
enum Accepted {
    Ack(AckCode, Option<&'static str>),
    NoAck,
    Stopped,
}

/// Logs (when durable), dispatches and, in after-delivery mode, waits for
/// one message.
async fn accept(shared: &Arc<Shared>, msh: &Msh, payload: Bytes) -> Accepted {
    // Waiting here stops this connection reading: back-pressure to the sender.
    let permit = tokio::select! {
        _ = shared.stop.cancelled() => return Accepted::Stopped,
        p = shared.capacity.clone().acquire_owned() => match p {
            Ok(p) => p,
            Err(_) => return Accepted::Stopped,
        },
    };
    let permit = Some(permit);
    let mut wal_id = None;
    if let Some(wal) = &shared.wal {
        let id = shared.next_message_id.fetch_add(1, Ordering::SeqCst);
        // No sender waits in no-ACK mode, so nothing waits for the disk.
        let logged = if shared.ack_mode == AckMode::None {
            wal.append_unconfirmed(id, payload.clone())
        } else {
            wal.append(id, payload.clone()).await
        };
        if let Err(e) = logged {
            if shared.stop.is_cancelled() {
                return Accepted::Stopped;
            }
            warn!(error = %e, control_id = %msh.control_id, "durable queue write failed");
            shared.failed.fetch_add(1, Ordering::SeqCst);
            return match shared.ack_mode {
                AckMode::None => Accepted::NoAck,
                _ => Accepted::Ack(AckCode::AE, Some("durable queue write failed")),
            };
        }
        wal_id = Some(id);
    }
    if shared.stop.is_cancelled() {
        return Accepted::Stopped;
    }
    match shared.ack_mode {
        AckMode::AfterDelivery => {
            let (tx, rx) = oneshot::channel();
            dispatch(
                shared,
                &msh.control_id,
                &payload,
                wal_id,
                &BTreeSet::new(),
                Some(tx),
                permit,
            );
            let outcome = tokio::select! {
                _ = shared.stop.cancelled() => None,
                r = rx => r.ok(),
            };
            match outcome {
                None => Accepted::Stopped,
                Some(Outcome::Delivered) => Accepted::Ack(AckCode::AA, None),
                Some(Outcome::Failed) => {
                    Accepted::Ack(AckCode::AE, Some("downstream delivery failed"))
                }
            }
        }
        AckMode::AfterEnqueue => {
            dispatch(
                shared,
                &msh.control_id,
                &payload,
                wal_id,
                &BTreeSet::new(),
                None,
                permit,
            );
            Accepted::Ack(AckCode::AA, None)
        }
        AckMode::None => {
            dispatch(
                shared,
                &msh.control_id,
                &payload,
                wal_id,
                &BTreeSet::new(),
                None,
                permit,
            );
            Accepted::NoAck
        }
    }
}

/// Runs `payload` down every route and queues one delivery per destination
/// not in `done`.
fn dispatch(
    shared: &Arc<Shared>,
    control_id: &str,
    payload: &Bytes,
    wal_id: Option<u64>,
    done: &BTreeSet<u32>,
    outcome: Option<oneshot::Sender<Outcome>>,
    permit: Option<OwnedSemaphorePermit>,
) {
    let mut deliveries = Vec::new();
    for route in &shared.routes {
        let (body, routed_id) = match &route.transform {
            None => (payload.clone(), Some(control_id.to_owned())),
            Some(t) => {
                let out = Bytes::from(t.apply(payload));
                let id = match Msh::parse(&out) {
                    Ok(m) => Some(m.control_id),
                    Err(e) => {
                        warn!(route = %route.name, error = %e, control_id, "transform left no readable msh");
                        None
                    }
                };
                (out, id)
            }
        };
        for &d in &route.destinations {
            if !done.contains(&d) {
                deliveries.push((d, body.clone(), routed_id.clone()));
            }
        }
    }
    let tracker = Arc::new(Tracker {
        wal_id,
        control_id: control_id.to_owned(),
        remaining: AtomicUsize::new(deliveries.len()),
        failed: AtomicBool::new(false),
        outcome: std::sync::Mutex::new(outcome),
        _permit: permit,
    });
    if deliveries.is_empty() {
        // Replayed with every destination already done.
        finish(shared, &tracker);
        return;
    }
    for (d, payload, routed_id) in deliveries {
        let Some(control_id) = routed_id else {
            complete(shared, &tracker, d, false);
            continue;
        };
        let dest = &shared.destinations[d as usize];
        shared.queue_depth.fetch_add(1, Ordering::SeqCst);
        let delivery = Delivery {
            payload,
            control_id,
            tracker: tracker.clone(),
        };
        // The receiver lives in `shared`, so this cannot fail while we run.
        if dest.tx.send(delivery).is_err() {
            shared.queue_depth.fetch_sub(1, Ordering::SeqCst);
            shared.bump();
        }
    }
}

/// Records one destination's result for a message.
fn complete(shared: &Shared, tracker: &Tracker, destination: u32, delivered: bool) {
    if delivered {
        if let (Some(wal), Some(id)) = (&shared.wal, tracker.wal_id) {
            wal.done(id, destination);
        }
    } else {
        tracker.failed.store(true, Ordering::SeqCst);
    }
    if tracker.remaining.fetch_sub(1, Ordering::SeqCst) == 1 {
        finish(shared, tracker);
    }
}

/// Every destination is through with a message.
fn finish(shared: &Shared, tracker: &Tracker) {
    let outcome = if tracker.failed.load(Ordering::SeqCst) {
        shared.failed.fetch_add(1, Ordering::SeqCst);
        warn!(control_id = %tracker.control_id, "message failed on at least one destination");
        Outcome::Failed
    } else {
        shared.processed.fetch_add(1, Ordering::SeqCst);
        // A failed message stays in the durable queue for the next start.
        if let (Some(wal), Some(id)) = (&shared.wal, tracker.wal_id) {
            wal.finished(id);
        }
        Outcome::Delivered
    };
    if let Some(tx) = lock(&tracker.outcome).take() {
        // The connection may have gone away meanwhile (engine stopping).
        let _ = tx.send(outcome);
    }
}

/// When a new connection should close, jittered uniformly in `[age, 2 age]`
/// so connections opened together do not all reconnect together.
fn connection_deadline(age: Duration) -> Option<Instant> {
    if age.is_zero() {
        return None;
    }
    let jitter = rand::rng().random_range(0.0..=1.0);
    Some(Instant::now() + age + age.mul_f64(jitter))
}

async fn forwarder(shared: Arc<Shared>, config: Arc<EngineConfig>, dest: Arc<Destination>) {
    let mut downstream: Option<Framed<TcpStream, MllpCodec>> = None;
    let mut backoff = Backoff::new();
    loop {
        // Connect before taking work, so while downstream is down messages
        // stay queued (visible as queue depth) instead of failing.
        if downstream.is_none() {
            let connected = tokio::select! {
                _ = shared.stop.cancelled() => return,
                r = connect(&config, dest.addr) => r,
            };
            match connected {
                Ok(f) => {
                    backoff.reset();
                    downstream = Some(f);
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    debug!(error = %e, retry_in = ?delay, "downstream connect failed");
                    tokio::select! {
                        _ = shared.stop.cancelled() => return,
                        _ = sleep(delay) => continue,
                    }
                }
            }
        }
        let job = {
            let mut rx = dest.rx.lock().await;
            tokio::select! {
                _ = shared.stop.cancelled() => return,
                job = rx.recv() => job,
            }
        };
        let Some(job) = job else { return };
        shared.in_flight.fetch_add(1, Ordering::SeqCst);
        shared.queue_depth.fetch_sub(1, Ordering::SeqCst);
        let span = info_span!("deliver", control_id = %job.control_id);
        let outcome = async {
            tokio::select! {
                _ = shared.stop.cancelled() => None,
                o = forward(&config, dest.addr, &mut downstream, &job) => Some(o),
            }
        }
        .instrument(span)
        .await;
        if let Some(outcome) = outcome {
            complete(
                &shared,
                &job.tracker,
                dest.index,
                outcome == Outcome::Delivered,
            );
        }
        shared.in_flight.fetch_sub(1, Ordering::SeqCst);
        shared.bump();
    }
}

#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error("timed out")]
    Timeout,
    #[error("downstream closed the connection")]
    Closed,
    #[error("downstream ack has the wrong control id {got:?}")]
    WrongAck { got: String },
    #[error("downstream answered {code}")]
    Nack { code: AckCode },
    #[error("downstream ack is unreadable")]
    BadAck(#[source] hl7::Hl7Error),
    #[error("downstream connection failed")]
    Io(#[source] std::io::Error),
    #[error("downstream framing failed")]
    Mllp(#[source] MllpError),
}

async fn connect(
    config: &EngineConfig,
    addr: SocketAddr,
) -> Result<Framed<TcpStream, MllpCodec>, ForwardError> {
    let socket = timeout(config.downstream_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ForwardError::Timeout)?
        .map_err(ForwardError::Io)?;
    let _ = socket.set_nodelay(true);
    Ok(Framed::new(socket, MllpCodec::new(config.max_frame_bytes)))
}

/// Tries to deliver `job` up to `max_attempts` times, reconnecting as needed.
async fn forward(
    config: &EngineConfig,
    addr: SocketAddr,
    downstream: &mut Option<Framed<TcpStream, MllpCodec>>,
    job: &Delivery,
) -> Outcome {
    let mut backoff = Backoff::new();
    for attempt in 1..=config.max_attempts {
        let result = match downstream {
            Some(framed) => send_once(config, framed, job).await,
            None => match connect(config, addr).await {
                Ok(framed) => send_once(config, downstream.insert(framed), job).await,
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(()) => return Outcome::Delivered,
            Err(e) => {
                // After anything but a clean NACK the stream may hold a late
                // ACK for this attempt; start over on a fresh connection.
                if !matches!(e, ForwardError::Nack { .. }) {
                    *downstream = None;
                }
                if attempt == config.max_attempts {
                    warn!(error = %e, attempts = attempt, "giving up on message");
                    break;
                }
                let delay = backoff.next_delay();
                debug!(error = %e, attempt, retry_in = ?delay, "delivery attempt failed");
                sleep(delay).await;
            }
        }
    }
    Outcome::Failed
}

async fn send_once(
    config: &EngineConfig,
    framed: &mut Framed<TcpStream, MllpCodec>,
    job: &Delivery,
) -> Result<(), ForwardError> {
    let exchange = async {
        framed
            .send(job.payload.clone())
            .await
            .map_err(ForwardError::Mllp)?;
        match framed.next().await {
            None => Err(ForwardError::Closed),
            Some(Err(e)) => Err(ForwardError::Mllp(e)),
            Some(Ok(reply)) => Ok(reply),
        }
    };
    let reply = timeout(config.downstream_timeout, exchange)
        .await
        .map_err(|_| ForwardError::Timeout)??;
    let (code, acked) = hl7::parse_ack(&reply).map_err(ForwardError::BadAck)?;
    if acked != job.control_id {
        return Err(ForwardError::WrongAck { got: acked });
    }
    if code.is_accept() {
        Ok(())
    } else {
        Err(ForwardError::Nack { code })
    }
}

/// Doubling delay between [`MIN_BACKOFF`] and [`MAX_BACKOFF`].
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self { next: MIN_BACKOFF }
    }

    fn reset(&mut self) {
        self.next = MIN_BACKOFF;
    }

    fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_ceiling() {
        let mut b = Backoff::new();
        let delays: Vec<_> = (0..10).map(|_| b.next_delay()).collect();
        assert_eq!(delays[0], MIN_BACKOFF);
        assert_eq!(delays[1], MIN_BACKOFF * 2);
        assert_eq!(*delays.last().expect("delays"), MAX_BACKOFF);
        b.reset();
        assert_eq!(b.next_delay(), MIN_BACKOFF);
    }

    #[tokio::test]
    async fn connection_deadline_is_jittered_within_bounds() {
        assert_eq!(connection_deadline(Duration::ZERO), None);
        let age = Duration::from_secs(300);
        let now = Instant::now();
        for _ in 0..100 {
            let d = connection_deadline(age).expect("deadline");
            assert!(d >= now + age && d <= now + 2 * age);
        }
    }

    #[test]
    fn invalid_config_is_refused() {
        let config = EngineConfig {
            forwarders: 0,
            ..EngineConfig::default()
        };
        let err = validate(&config).expect_err("invalid");
        assert_eq!(
            err.to_string(),
            "invalid engine config: forwarders must be at least 1"
        );
        assert!(validate(&EngineConfig::default()).is_ok());
    }

    #[test]
    fn invalid_routes_are_refused() {
        let no_destinations = EngineConfig {
            routes: vec![Route::pass_through("empty", vec![])],
            ..EngineConfig::default()
        };
        assert!(matches!(
            validate(&no_destinations),
            Err(EngineError::InvalidConfig {
                field: "routes",
                ..
            })
        ));
        let drops_msh = EngineConfig {
            routes: vec![Route {
                name: "bad".to_owned(),
                transform: Some(Transform::new(vec![crate::transform::Step::DropSegments {
                    segment: "MSH".to_owned(),
                }])),
                destinations: vec![DEFAULT_DOWNSTREAM],
            }],
            ..EngineConfig::default()
        };
        let err = validate(&drops_msh).expect_err("invalid");
        assert_eq!(err.to_string(), "invalid transform on route bad");
    }

    #[test]
    fn no_routes_means_pass_through_to_downstream() {
        let config = EngineConfig::default();
        let routes = config.effective_routes();
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0].destinations, vec![DEFAULT_DOWNSTREAM]);
        assert!(routes[0].active_transform().is_none());
        assert_eq!(config.ack_mode, AckMode::AfterDelivery);
        assert_eq!(config.queue_dir, None);
    }
}
