//! The reference pass-through engine: MLLP in, queue, MLLP out.
//!
//! The promise is "no accepted message is lost": a sender gets AA only after
//! the downstream system ACKed the message (after-delivery acknowledgment), AE
//! when delivery failed, and nothing at all when the engine stops with the
//! message still queued — then the sender resends it elsewhere.
//!
//! Three kinds of task share one `Shared` state:
//! - the accept loop (`accept_loop`) spawns one `connection` task per
//!   sender, or drops the socket at once while draining;
//! - each connection reads one frame, queues it as a `Job` and waits for its
//!   outcome before writing the ACK and reading the next frame (MLLP is one
//!   message at a time);
//! - `forwarder` tasks each hold one downstream connection and work the
//!   queue.
//!
//! Connections close only at message boundaries: on drain, and once they
//! reach their jittered `max_connection_age` (see DESIGN.md, "Long-lived
//! connections and scale-out").

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use rand::Rng;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::hl7::{self, AckCode, Msh};
use crate::mllp::{DEFAULT_MAX_FRAME_BYTES, MllpCodec, MllpError};

/// Connections close at a message boundary after this age (jittered up to
/// twice as long), so load spreads onto new minions within minutes.
pub const DEFAULT_MAX_CONNECTION_AGE: Duration = Duration::from_secs(5 * 60);
/// Downstream connections working the queue.
pub const DEFAULT_FORWARDERS: usize = 4;
/// How long to wait for a downstream connect or ACK.
pub const DEFAULT_DOWNSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// Delivery attempts before a message is reported failed (AE upstream).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
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

/// Engine settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// Where senders (through the load balancer) connect.
    pub listen: SocketAddr,
    /// The system messages are passed on to.
    pub downstream: SocketAddr,
    /// Largest inbound payload; a larger frame closes its connection.
    pub max_frame_bytes: usize,
    /// Close each inbound connection at a message boundary after a random
    /// age in `[max_connection_age, 2 * max_connection_age]`. ZERO = never.
    pub max_connection_age: Duration,
    /// Downstream connections working the queue.
    pub forwarders: usize,
    /// Limit on a downstream connect and on waiting for a downstream ACK.
    pub downstream_timeout: Duration,
    /// Delivery attempts before a message is reported failed (AE upstream).
    pub max_attempts: u32,
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
    /// The listen address could not be bound.
    #[error("failed to listen on {addr}")]
    Bind {
        /// The address from the config.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A snapshot of the engine's counters, as the minion reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStatus {
    /// Accepted and not yet taken by a forwarder.
    pub queue_depth: u64,
    /// Taken by a forwarder and not yet ACKed downstream (or given up).
    pub in_flight: u64,
    /// Delivered and ACKed downstream, since start.
    pub processed: u64,
    /// Given up after `max_attempts` (answered AE upstream), since start.
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
    queue_depth: AtomicU64,
    in_flight: AtomicU64,
    processed: AtomicU64,
    failed: AtomicU64,
    open_connections: AtomicU64,
    healthy: AtomicBool,
    /// Whether intake is draining; connections watch it to close when idle.
    draining: watch::Sender<bool>,
    /// Bumped whenever a counter that `drained` depends on goes down.
    changed: watch::Sender<u64>,
    /// Stops every task, queued messages or not.
    stop: CancellationToken,
    /// Source of ACK control ids (MSH-10 of the ACKs we send).
    ack_ids: AtomicU64,
    /// Accept loop and forwarders, awaited by `shutdown`.
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
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

    fn next_ack_id(&self) -> String {
        format!("GRU{}", self.ack_ids.fetch_add(1, Ordering::Relaxed) + 1)
    }
}

/// A message accepted from a sender, waiting for a forwarder.
struct Job {
    payload: Bytes,
    control_id: String,
    outcome: oneshot::Sender<Outcome>,
}

/// How delivery of a [`Job`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Downstream ACKed it: answer AA.
    Delivered,
    /// Gave up after `max_attempts`: answer AE.
    Failed,
}

type JobQueue = Arc<Mutex<mpsc::UnboundedReceiver<Job>>>;

/// Binds the listener, spawns the accept loop and forwarders, and returns.
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
    let shared = Arc::new(Shared {
        local_addr,
        queue_depth: AtomicU64::new(0),
        in_flight: AtomicU64::new(0),
        processed: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        open_connections: AtomicU64::new(0),
        healthy: AtomicBool::new(true),
        draining: watch::Sender::new(false),
        changed: watch::Sender::new(0),
        stop: CancellationToken::new(),
        ack_ids: AtomicU64::new(0),
        tasks: std::sync::Mutex::new(Vec::new()),
    });
    let (queue_tx, queue_rx) = mpsc::unbounded_channel();
    let queue: JobQueue = Arc::new(Mutex::new(queue_rx));
    let config = Arc::new(config);
    let mut tasks = Vec::with_capacity(config.forwarders + 1);
    for id in 0..config.forwarders {
        let span = info_span!("forwarder", id, downstream = %config.downstream);
        tasks.push(tokio::spawn(
            forwarder(shared.clone(), config.clone(), queue.clone()).instrument(span),
        ));
    }
    let span = info_span!("engine", listen = %local_addr);
    tasks.push(tokio::spawn(
        accept_loop(listener, shared.clone(), config.clone(), queue_tx).instrument(span),
    ));
    *lock(&shared.tasks) = tasks;
    info!(listen = %local_addr, downstream = %config.downstream, "engine started");
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
    Ok(())
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the Vec inconsistent.
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

    /// Starts draining: idle connections close now, busy ones after their
    /// current message's ACK, new connections are closed on arrival, and the
    /// queue keeps flushing downstream. Idempotent.
    pub fn drain(&self) {
        let was = self.shared.draining.send_replace(true);
        if !was {
            info!(listen = %self.shared.local_addr, "draining");
        }
        self.shared.bump();
    }

    /// Stops draining: new connections are served again.
    pub fn resume(&self) {
        let was = self.shared.draining.send_replace(false);
        if was {
            info!(listen = %self.shared.local_addr, "resumed");
        }
        self.shared.bump();
    }

    /// Resolves once the engine is draining with no queue, nothing in flight
    /// and no open connections.
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
    /// every task. Messages still queued get no ACK, so their senders resend.
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
        info!(listen = %self.shared.local_addr, "engine stopped");
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    config: Arc<EngineConfig>,
    queue: mpsc::UnboundedSender<Job>,
) {
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
        tokio::spawn(
            connection(socket, shared.clone(), config.clone(), queue.clone(), guard)
                .instrument(span),
        );
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
    Stopped,
    Error,
}

async fn connection(
    socket: TcpStream,
    shared: Arc<Shared>,
    config: Arc<EngineConfig>,
    queue: mpsc::UnboundedSender<Job>,
    _guard: ConnectionGuard,
) {
    let mut framed = Framed::new(socket, MllpCodec::new(config.max_frame_bytes));
    let mut draining = shared.draining.subscribe();
    let age_deadline = connection_deadline(config.max_connection_age);
    let mut messages = 0u64;
    let closed = loop {
        let closing = if *draining.borrow_and_update() {
            Some(CloseReason::Draining)
        } else if age_deadline.is_some_and(|d| Instant::now() >= d) {
            Some(CloseReason::MaxAge)
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
        let ack = match Msh::parse(&payload) {
            Err(e) => {
                warn!(error = %e, bytes = payload.len(), "rejecting message without a readable msh");
                hl7::build_ack(
                    &Msh::unreadable(),
                    AckCode::AR,
                    &shared.next_ack_id(),
                    Some(&e.to_string()),
                )
            }
            Ok(msh) => {
                let Some(outcome) = deliver(&shared, &queue, &msh, payload).await else {
                    // The engine is stopping with the message undelivered:
                    // no ACK, so the sender resends it elsewhere.
                    break CloseReason::Stopped;
                };
                match outcome {
                    Outcome::Delivered => {
                        hl7::build_ack(&msh, AckCode::AA, &shared.next_ack_id(), None)
                    }
                    Outcome::Failed => hl7::build_ack(
                        &msh,
                        AckCode::AE,
                        &shared.next_ack_id(),
                        Some("downstream delivery failed"),
                    ),
                }
            }
        };
        if let Err(e) = framed.send(Bytes::from(ack)).await {
            warn!(error = %e, "failed to write ack");
            break CloseReason::Error;
        }
        messages += 1;
    };
    debug!(reason = ?closed, messages, "connection closed");
}

/// Queues one message and waits for its outcome; `None` if the engine stops
/// first.
async fn deliver(
    shared: &Shared,
    queue: &mpsc::UnboundedSender<Job>,
    msh: &Msh,
    payload: Bytes,
) -> Option<Outcome> {
    let (tx, rx) = oneshot::channel();
    let job = Job {
        payload,
        control_id: msh.control_id.clone(),
        outcome: tx,
    };
    shared.queue_depth.fetch_add(1, Ordering::SeqCst);
    if queue.send(job).is_err() {
        shared.queue_depth.fetch_sub(1, Ordering::SeqCst);
        shared.bump();
        return None;
    }
    tokio::select! {
        _ = shared.stop.cancelled() => None,
        r = rx => r.ok(),
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

async fn forwarder(shared: Arc<Shared>, config: Arc<EngineConfig>, queue: JobQueue) {
    let mut downstream: Option<Framed<TcpStream, MllpCodec>> = None;
    let mut backoff = Backoff::new();
    loop {
        // Connect before taking work, so while downstream is down messages
        // stay queued (visible as queue depth) instead of failing.
        if downstream.is_none() {
            let connected = tokio::select! {
                _ = shared.stop.cancelled() => return,
                r = connect(&config) => r,
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
            let mut rx = queue.lock().await;
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
                o = forward(&config, &mut downstream, &job) => Some(o),
            }
        }
        .instrument(span)
        .await;
        match outcome {
            Some(Outcome::Delivered) => {
                shared.processed.fetch_add(1, Ordering::SeqCst);
            }
            Some(Outcome::Failed) => {
                shared.failed.fetch_add(1, Ordering::SeqCst);
            }
            None => {}
        }
        if let Some(outcome) = outcome {
            // The connection may have gone away meanwhile (engine stopping).
            let _ = job.outcome.send(outcome);
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

async fn connect(config: &EngineConfig) -> Result<Framed<TcpStream, MllpCodec>, ForwardError> {
    let socket = timeout(
        config.downstream_timeout,
        TcpStream::connect(config.downstream),
    )
    .await
    .map_err(|_| ForwardError::Timeout)?
    .map_err(ForwardError::Io)?;
    let _ = socket.set_nodelay(true);
    Ok(Framed::new(socket, MllpCodec::new(config.max_frame_bytes)))
}

/// Tries to deliver `job` up to `max_attempts` times, reconnecting as needed.
async fn forward(
    config: &EngineConfig,
    downstream: &mut Option<Framed<TcpStream, MllpCodec>>,
    job: &Job,
) -> Outcome {
    let mut backoff = Backoff::new();
    for attempt in 1..=config.max_attempts {
        let result = match downstream {
            Some(framed) => send_once(config, framed, job).await,
            None => match connect(config).await {
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
    job: &Job,
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
}
