//! The benchmark DRIVER and SINK behind `gru bench` and `gru dev`.
//!
//! The DRIVER behaves like a real HL7 sender: one message at a time per
//! connection, waiting for each ACK, reconnecting when the server closes the
//! connection and resending whatever was not yet ACKed (at-least-once). The
//! SINK plays the downstream system: it records every MSH-10 it sees and
//! answers AA, optionally after a delay. Together they check the engine's
//! promise: every control id the DRIVER saw ACKed must be in the SINK.

use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior, sleep, sleep_until, timeout};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, warn};

use crate::hl7::{self, AckCode, Msh};
use crate::mllp::{DEFAULT_MAX_FRAME_BYTES, MllpCodec};
use crate::synth::{MAX_MESSAGE_BYTES, Mix, Synth};

/// How long the DRIVER waits for outstanding ACKs after it stops sending.
pub const DRIVE_FINISH_WAIT: Duration = Duration::from_secs(5);
/// Without ACKs, how long the DRIVER waits after it stops sending for the
/// server to read everything and close. Streamed messages can fill socket
/// buffers several megabytes deep, and closing before the server read them
/// would reset the connection and lose them.
pub const DRIVE_NO_ACK_FINISH_WAIT: Duration = Duration::from_secs(30);
/// How long the DRIVER waits for one ACK before giving up on the connection
/// and resending on a new one.
pub const DRIVE_ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// Default pause before a DRIVER connection reconnects.
pub const DEFAULT_RECONNECT_BACKOFF: Duration = Duration::from_millis(100);
/// Default synthetic message size.
pub const DEFAULT_MESSAGE_BYTES: usize = 1024;
/// Pause after a failed `accept` in the SINK.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// Latency histogram range, in microseconds: 1 µs to 1 hour.
const LATENCY_MAX_MICROS: u64 = 3_600_000_000;

/// Errors of the DRIVER and SINK.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The configuration cannot work.
    #[error("invalid bench config: {field} {reason}")]
    InvalidConfig {
        /// The offending field.
        field: &'static str,
        /// What was expected.
        reason: &'static str,
    },
}

/// SINK settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkConfig {
    /// Wait this long before each ACK, to play a slow downstream system.
    pub ack_delay: Duration,
    /// Largest payload accepted.
    pub max_frame_bytes: usize,
}

impl Default for SinkConfig {
    fn default() -> Self {
        Self {
            ack_delay: Duration::ZERO,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
        }
    }
}

/// Live SINK counters, shared with whoever reports progress or checks loss.
#[derive(Clone, Default)]
pub struct SinkHandle {
    inner: Arc<SinkInner>,
}

#[derive(Default)]
struct SinkInner {
    received: AtomicU64,
    control_ids: std::sync::Mutex<HashSet<String>>,
    /// Every payload received, when capturing (tests checking transforms).
    captured: Option<std::sync::Mutex<Vec<Bytes>>>,
}

impl SinkHandle {
    /// Fresh counters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Fresh counters that also keep every payload received, for checking
    /// what a route delivered. Memory grows with every message: tests only.
    pub fn capturing() -> Self {
        Self {
            inner: Arc::new(SinkInner {
                captured: Some(std::sync::Mutex::new(Vec::new())),
                ..SinkInner::default()
            }),
        }
    }

    /// The payloads received, in arrival order, duplicates included; empty
    /// unless made with [`capturing`](Self::capturing).
    pub fn captured(&self) -> Vec<Bytes> {
        self.inner.captured.as_ref().map_or_else(Vec::new, |c| {
            c.lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone()
        })
    }

    /// Messages received, duplicates included.
    pub fn received(&self) -> u64 {
        self.inner.received.load(Ordering::SeqCst)
    }

    /// Distinct control ids received.
    pub fn unique_received(&self) -> u64 {
        self.ids().len() as u64
    }

    /// Every distinct MSH-10 received, for loss checks (unordered).
    pub fn control_ids(&self) -> Vec<String> {
        self.ids().iter().cloned().collect()
    }

    /// Whether `control_id` was received.
    pub fn contains(&self, control_id: &str) -> bool {
        self.ids().contains(control_id)
    }

    fn ids(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        // Inserting into a HashSet cannot leave it half-updated.
        self.inner
            .control_ids
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn record(&self, control_id: String, payload: &Bytes) {
        if let Some(c) = &self.inner.captured {
            c.lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .push(payload.clone());
        }
        self.ids().insert(control_id);
        self.inner.received.fetch_add(1, Ordering::SeqCst);
    }
}

/// What a SINK run saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SinkSummary {
    /// Messages received, duplicates included.
    pub received: u64,
    /// Distinct control ids.
    pub unique: u64,
    /// From start to shutdown.
    #[serde(with = "humantime_serde")]
    pub elapsed: Duration,
}

/// Serves as the downstream system on `listener` until `shutdown` resolves:
/// records each message's MSH-10 in `stats`, then answers AA (AR when the MSH
/// is unreadable).
pub async fn run_sink(
    listener: TcpListener,
    config: SinkConfig,
    stats: SinkHandle,
    shutdown: impl Future<Output = ()>,
) -> Result<SinkSummary, BenchError> {
    if config.max_frame_bytes == 0 {
        return Err(BenchError::InvalidConfig {
            field: "max_frame_bytes",
            reason: "must be at least 1",
        });
    }
    let started = Instant::now();
    let config = Arc::new(config);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            // Reap finished connection tasks so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((socket, peer)) => {
                let _ = socket.set_nodelay(true);
                let span = info_span!("sink_connection", peer = %peer);
                connections
                    .spawn(sink_connection(socket, config.clone(), stats.clone()).instrument(span));
            }
            Err(e) => {
                warn!(error = %e, "sink accept failed");
                sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
    connections.shutdown().await;
    Ok(SinkSummary {
        received: stats.received(),
        unique: stats.unique_received(),
        elapsed: started.elapsed(),
    })
}

async fn sink_connection(socket: TcpStream, config: Arc<SinkConfig>, stats: SinkHandle) {
    let mut framed = Framed::new(socket, MllpCodec::new(config.max_frame_bytes));
    let mut ack_ids = 0u64;
    while let Some(frame) = framed.next().await {
        let payload = match frame {
            Ok(p) => p,
            Err(e) => {
                debug!(error = %e, "sink connection ended");
                return;
            }
        };
        ack_ids += 1;
        let ack = match Msh::parse(&payload) {
            Ok(msh) => {
                stats.record(msh.control_id.clone(), &payload);
                if !config.ack_delay.is_zero() {
                    sleep(config.ack_delay).await;
                }
                hl7::build_ack(&msh, AckCode::AA, &format!("SINK{ack_ids}"), None)
            }
            Err(e) => hl7::build_reject(&e, &format!("SINK{ack_ids}")),
        };
        if let Err(e) = framed.send(Bytes::from(ack)).await {
            debug!(error = %e, "sink failed to write ack");
            return;
        }
    }
}

/// DRIVER settings.
#[derive(Debug, Clone, PartialEq)]
pub struct DriveConfig {
    /// Wait for each message's ACK before sending the next (a real HL7
    /// sender). `false` is the no-ACK workload: each connection streams
    /// messages without waiting, reads and discards whatever comes back, and
    /// does not resend after a reconnect, so delivery is judged at the SINK.
    pub wait_for_ack: bool,
    /// How often each message kind is drawn.
    pub mix: Mix,
    /// Where to send (the engine or its load balancer).
    pub target: SocketAddr,
    /// Total messages per second over all connections; `None` = as fast as
    /// ACKs come back.
    pub rate: Option<f64>,
    /// How long to send new messages.
    pub duration: Duration,
    /// Concurrent sender connections.
    pub connections: usize,
    /// Seed for the synthetic messages.
    pub seed: u64,
    /// Approximate message size.
    pub message_bytes: usize,
    /// Pause before reconnecting after the server closed a connection.
    pub reconnect_backoff: Duration,
}

impl Default for DriveConfig {
    /// 4 connections at 100 msg/s for 10 s to 127.0.0.1:2575, 1 KiB messages
    /// of every kind, waiting for ACKs: what `gru bench drive` does without
    /// flags.
    fn default() -> Self {
        Self {
            target: SocketAddr::from(([127, 0, 0, 1], 2575)),
            rate: Some(100.0),
            duration: Duration::from_secs(10),
            connections: 4,
            seed: 1,
            message_bytes: DEFAULT_MESSAGE_BYTES,
            reconnect_backoff: DEFAULT_RECONNECT_BACKOFF,
            wait_for_ack: true,
            mix: Mix::default(),
        }
    }
}

/// Live DRIVER counters for a progress line.
#[derive(Clone, Default)]
pub struct DriveHandle {
    inner: Arc<DriveCounters>,
}

#[derive(Default)]
struct DriveCounters {
    sent: AtomicU64,
    acked: AtomicU64,
    nacked: AtomicU64,
    reconnects: AtomicU64,
    errors: AtomicU64,
}

impl DriveHandle {
    /// Fresh counters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Distinct messages sent (a resend after reconnecting is not counted again).
    pub fn sent(&self) -> u64 {
        self.inner.sent.load(Ordering::SeqCst)
    }

    /// Messages answered AA (or CA).
    pub fn acked(&self) -> u64 {
        self.inner.acked.load(Ordering::SeqCst)
    }

    /// Messages answered with any other code.
    pub fn nacked(&self) -> u64 {
        self.inner.nacked.load(Ordering::SeqCst)
    }

    /// Times a connection was re-established after the server closed it or
    /// it failed.
    pub fn reconnects(&self) -> u64 {
        self.inner.reconnects.load(Ordering::SeqCst)
    }

    /// Failed connects, ACK timeouts, unreadable or mismatched ACKs.
    pub fn errors(&self) -> u64 {
        self.inner.errors.load(Ordering::SeqCst)
    }

    fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::SeqCst);
    }
}

/// What a DRIVER run achieved.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DriveSummary {
    /// Whether each message waited for its ACK (`false`: the no-ACK workload).
    pub wait_for_ack: bool,
    /// Distinct messages sent (without ACKs: handed to the connection).
    pub sent: u64,
    /// Answered AA.
    pub acked: u64,
    /// Answered AE/AR.
    pub nacked: u64,
    /// Failed connects, ACK timeouts, unreadable ACKs, broken connections.
    pub errors: u64,
    /// Reconnections after the server closed a connection.
    pub reconnects: u64,
    /// From start until the last outstanding ACK (or the finish wait ran out).
    pub elapsed_secs: f64,
    /// `sent / elapsed_secs`.
    pub sent_per_sec: f64,
    /// `acked / elapsed_secs`.
    pub acked_per_sec: f64,
    /// Send to ACK, per attempt that got an answer; 0 without ACKs.
    pub latency_p50_ms: f64,
    /// Send to ACK, 99th percentile; 0 without ACKs.
    pub latency_p99_ms: f64,
    /// Send to ACK, worst; 0 without ACKs.
    pub latency_max_ms: f64,
    /// Every control id answered AA, for loss checks against the SINK. Not
    /// serialized: a long run has millions.
    #[serde(skip)]
    pub acked_control_ids: Vec<String>,
    /// Without ACKs, every control id sent (with ACKs: empty). Not
    /// serialized.
    #[serde(skip)]
    pub sent_control_ids: Vec<String>,
}

impl DriveSummary {
    /// The control ids a SINK behind the target must hold once delivery is
    /// complete: those ACKed, or, without ACKs, all those sent.
    pub fn expected_at_sink(&self) -> &[String] {
        if self.wait_for_ack {
            &self.acked_control_ids
        } else {
            &self.sent_control_ids
        }
    }
}

/// Tells DRIVER connections when to stop.
#[derive(Clone)]
struct DriveStop {
    /// Send no new messages.
    no_new: CancellationToken,
    /// Stop waiting for outstanding ACKs too.
    hard: CancellationToken,
}

/// What one DRIVER connection contributes to the summary.
struct ConnResult {
    latency: Histogram<u64>,
    acked_ids: Vec<String>,
    /// Only without ACKs.
    sent_ids: Vec<String>,
}

impl ConnResult {
    fn new() -> Self {
        ConnResult {
            latency: new_histogram(),
            acked_ids: Vec::new(),
            sent_ids: Vec::new(),
        }
    }
}

/// Sends synthetic messages to `config.target` for `config.duration` (or
/// until `shutdown`), then waits up to [`DRIVE_FINISH_WAIT`] for outstanding
/// ACKs (without ACKs: up to [`DRIVE_NO_ACK_FINISH_WAIT`] for the server to
/// read what was sent).
/// ACKs.
pub async fn run_drive(
    config: DriveConfig,
    live: DriveHandle,
    shutdown: impl Future<Output = ()>,
) -> Result<DriveSummary, BenchError> {
    validate_drive(&config)?;
    let started = Instant::now();
    let end = started + config.duration;
    let stop = DriveStop {
        no_new: CancellationToken::new(),
        hard: CancellationToken::new(),
    };
    let config = Arc::new(config);
    let mut set = JoinSet::new();
    for conn in 0..config.connections {
        let span = info_span!("drive_connection", conn, target = %config.target);
        let (config, live, stop) = (config.clone(), live.clone(), stop.clone());
        if config.wait_for_ack {
            set.spawn(drive_connection(conn, config, live, stop, started).instrument(span));
        } else {
            set.spawn(drive_connection_no_ack(conn, config, live, stop, started).instrument(span));
        }
    }
    let stopper = async {
        tokio::select! {
            _ = shutdown => {}
            _ = sleep_until(end) => {}
        }
        stop.no_new.cancel();
        sleep(if config.wait_for_ack {
            DRIVE_FINISH_WAIT
        } else {
            DRIVE_NO_ACK_FINISH_WAIT
        })
        .await;
        stop.hard.cancel();
        std::future::pending::<()>().await;
    };
    let collect = async {
        let mut results = Vec::with_capacity(config.connections);
        while let Some(r) = set.join_next().await {
            match r {
                Ok(r) => results.push(r),
                Err(e) => warn!(error = %e, "drive connection task failed"),
            }
        }
        results
    };
    let results = tokio::select! {
        r = collect => r,
        _ = stopper => unreachable!("the stopper never finishes"),
    };
    let elapsed = started.elapsed().as_secs_f64();
    let mut latency = new_histogram();
    let mut acked_control_ids = Vec::new();
    let mut sent_control_ids = Vec::new();
    for r in results {
        // Same bounds everywhere, so adding cannot fail.
        let _ = latency.add(&r.latency);
        acked_control_ids.extend(r.acked_ids);
        sent_control_ids.extend(r.sent_ids);
    }
    let ms = |micros: u64| micros as f64 / 1000.0;
    let acked = live.acked();
    let sent = live.sent();
    let per_sec = |n: u64| {
        if elapsed > 0.0 {
            n as f64 / elapsed
        } else {
            0.0
        }
    };
    Ok(DriveSummary {
        wait_for_ack: config.wait_for_ack,
        sent,
        sent_per_sec: per_sec(sent),
        acked,
        nacked: live.nacked(),
        errors: live.errors(),
        reconnects: live.reconnects(),
        elapsed_secs: elapsed,
        acked_per_sec: per_sec(acked),
        latency_p50_ms: ms(latency.value_at_quantile(0.5)),
        latency_p99_ms: ms(latency.value_at_quantile(0.99)),
        latency_max_ms: ms(latency.max()),
        acked_control_ids,
        sent_control_ids,
    })
}

fn validate_drive(config: &DriveConfig) -> Result<(), BenchError> {
    let invalid = |field, reason| Err(BenchError::InvalidConfig { field, reason });
    if config.connections == 0 {
        return invalid("connections", "must be at least 1");
    }
    if let Some(rate) = config.rate
        && !(rate.is_finite() && rate > 0.0)
    {
        return invalid("rate", "must be a positive number of messages per second");
    }
    if config.message_bytes > MAX_MESSAGE_BYTES {
        return invalid("message_bytes", "must be at most 1 MiB (1048576)");
    }
    Ok(())
}

fn new_histogram() -> Histogram<u64> {
    // Constant, valid bounds.
    Histogram::new_with_bounds(1, LATENCY_MAX_MICROS, 3).expect("valid histogram bounds")
}

/// Connection `conn`'s own message generator: seeded apart from the others.
fn conn_synth(conn: usize, config: &DriveConfig) -> Synth {
    Synth::with_mix(
        config.seed ^ (conn as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        config.message_bytes,
        config.mix,
    )
}

/// Connection `conn`'s share of the rate, if one is set.
fn rate_ticker(
    conn: usize,
    config: &DriveConfig,
    started: Instant,
) -> Option<tokio::time::Interval> {
    config.rate.map(|rate| {
        let period = Duration::from_secs_f64(config.connections as f64 / rate);
        // Stagger connections over one period so they do not send in bursts.
        let offset = period.mul_f64(conn as f64 / config.connections as f64);
        let mut t = tokio::time::interval_at(started + offset, period);
        t.set_missed_tick_behavior(MissedTickBehavior::Delay);
        t
    })
}

/// One sender connection: send, wait for the ACK, repeat; on close,
/// reconnect and resend the unACKed message.
async fn drive_connection(
    conn: usize,
    config: Arc<DriveConfig>,
    live: DriveHandle,
    stop: DriveStop,
    started: Instant,
) -> ConnResult {
    let counters = &live.inner;
    let mut synth = conn_synth(conn, &config);
    let mut ticker = rate_ticker(conn, &config, started);
    let mut result = ConnResult::new();
    let mut framed: Option<Framed<TcpStream, MllpCodec>> = None;
    // The message sent but not yet answered: (control id, payload).
    let mut pending: Option<(String, Bytes)> = None;
    let mut seq = 0u64;
    let mut had_connection = false;
    loop {
        if pending.is_none() {
            if stop.no_new.is_cancelled() {
                break;
            }
            if let Some(t) = ticker.as_mut() {
                tokio::select! {
                    _ = stop.no_new.cancelled() => break,
                    _ = t.tick() => {}
                }
            }
            seq += 1;
            let id = format!("D{conn}-{seq}");
            let msg = Bytes::from(synth.message(&id));
            DriveHandle::add(&counters.sent);
            pending = Some((id, msg));
        }
        let Some((id, msg)) = pending.clone() else {
            continue;
        };
        let stream = match framed.as_mut() {
            Some(f) => f,
            None => match dial(&config, &stop, &live, had_connection).await {
                Dial::Connected(socket) => {
                    had_connection = true;
                    framed.insert(Framed::new(socket, MllpCodec::new(DEFAULT_MAX_FRAME_BYTES)))
                }
                Dial::Retry => continue,
                Dial::Stop => break,
            },
        };
        let sent_at = Instant::now();
        let exchange = async {
            stream.send(msg).await?;
            Ok::<_, crate::mllp::MllpError>(stream.next().await)
        };
        let answer = tokio::select! {
            _ = stop.hard.cancelled() => break,
            r = timeout(DRIVE_ACK_TIMEOUT, exchange) => r,
        };
        match answer {
            Ok(Ok(Some(Ok(reply)))) => match hl7::parse_ack(&reply) {
                Ok((code, acked)) if acked == id => {
                    let micros = sent_at.elapsed().as_micros().max(1) as u64;
                    let _ = result.latency.record(micros.min(LATENCY_MAX_MICROS));
                    if code.is_accept() {
                        DriveHandle::add(&counters.acked);
                        result.acked_ids.push(id);
                    } else {
                        debug!(code = %code, control_id = %id, "message refused");
                        DriveHandle::add(&counters.nacked);
                    }
                    pending = None;
                }
                Ok((_, acked)) => {
                    warn!(expected = %id, got = %acked, "ack for another message");
                    DriveHandle::add(&counters.errors);
                    framed = None;
                }
                Err(e) => {
                    warn!(error = %e, "unreadable ack");
                    DriveHandle::add(&counters.errors);
                    framed = None;
                }
            },
            // Closed by the server (a message boundary, or mid-wait):
            // reconnect and resend.
            Ok(Ok(None)) | Ok(Ok(Some(Err(_)))) | Ok(Err(_)) => {
                framed = None;
                if backoff(&config, &stop).await {
                    break;
                }
            }
            Err(_) => {
                warn!(control_id = %id, "ack timed out");
                DriveHandle::add(&counters.errors);
                framed = None;
            }
        }
    }
    result
}

/// One DRIVER connect attempt, counted as a reconnect after the first.
enum Dial {
    Connected(TcpStream),
    /// It failed (counted as an error); try again.
    Retry,
    /// The run is over.
    Stop,
}

async fn dial(config: &DriveConfig, stop: &DriveStop, live: &DriveHandle, reconnect: bool) -> Dial {
    let counters = &live.inner;
    if reconnect {
        DriveHandle::add(&counters.reconnects);
    }
    let connected = tokio::select! {
        _ = stop.hard.cancelled() => return Dial::Stop,
        r = timeout(DRIVE_ACK_TIMEOUT, TcpStream::connect(config.target)) => r,
    };
    match connected {
        Ok(Ok(socket)) => {
            let _ = socket.set_nodelay(true);
            Dial::Connected(socket)
        }
        Ok(Err(e)) => {
            debug!(error = %e, "connect failed");
            DriveHandle::add(&counters.errors);
            if backoff(config, stop).await {
                Dial::Stop
            } else {
                Dial::Retry
            }
        }
        Err(_) => {
            debug!("connect timed out");
            DriveHandle::add(&counters.errors);
            Dial::Retry
        }
    }
}

/// Waits out the reconnect backoff; true if the run is over meanwhile.
async fn backoff(config: &DriveConfig, stop: &DriveStop) -> bool {
    tokio::select! {
        _ = stop.hard.cancelled() => true,
        _ = sleep(config.reconnect_backoff) => false,
    }
}

/// How a no-ACK connection's writing ended.
enum Written {
    /// The run is over; everything was flushed.
    Finished,
    /// The connection broke or the server closed it.
    Broken,
}

/// Open-loop writes are flushed after this many messages (and whenever the
/// codec's buffer fills), so small messages share system calls.
const NO_ACK_FLUSH_EVERY: u64 = 16;

/// One no-ACK sender connection: streams messages without waiting, reads and
/// discards whatever comes back (so a server that ACKs anyway never blocks
/// on a full socket), and on a broken connection reconnects without
/// resending: a message in flight then is lost, which the SINK shows.
async fn drive_connection_no_ack(
    conn: usize,
    config: Arc<DriveConfig>,
    live: DriveHandle,
    stop: DriveStop,
    started: Instant,
) -> ConnResult {
    let counters = &live.inner;
    let mut synth = conn_synth(conn, &config);
    let mut ticker = rate_ticker(conn, &config, started);
    let mut result = ConnResult::new();
    let mut seq = 0u64;
    let mut had_connection = false;
    while !stop.no_new.is_cancelled() {
        let socket = match dial(&config, &stop, &live, had_connection).await {
            Dial::Connected(socket) => socket,
            Dial::Retry => continue,
            Dial::Stop => break,
        };
        had_connection = true;
        let (mut tx, mut rx) = Framed::new(socket, MllpCodec::new(DEFAULT_MAX_FRAME_BYTES)).split();
        let closed = CancellationToken::new();
        let read = async {
            while let Some(Ok(_)) = rx.next().await {}
            closed.cancel();
        };
        let write = async {
            let mut written = 0u64;
            let outcome = loop {
                if let Some(t) = ticker.as_mut() {
                    tokio::select! {
                        _ = stop.no_new.cancelled() => break Written::Finished,
                        _ = closed.cancelled() => break Written::Broken,
                        _ = t.tick() => {}
                    }
                } else if stop.no_new.is_cancelled() {
                    break Written::Finished;
                }
                seq += 1;
                let id = format!("D{conn}-{seq}");
                let msg = Bytes::from(synth.message(&id));
                let fed = tokio::select! {
                    r = tx.feed(msg) => r.is_ok(),
                    _ = closed.cancelled() => false,
                };
                if !fed {
                    break Written::Broken;
                }
                DriveHandle::add(&counters.sent);
                result.sent_ids.push(id);
                written += 1;
                if (ticker.is_some() || written.is_multiple_of(NO_ACK_FLUSH_EVERY))
                    && tx.flush().await.is_err()
                {
                    break Written::Broken;
                }
            };
            if let Written::Finished = outcome
                && (tx.flush().await.is_err() || tx.close().await.is_err())
            {
                return Written::Broken;
            }
            outcome
        };
        // After a clean finish, reading on until the server closes lets it
        // take every byte before the socket goes away.
        let outcome = tokio::select! {
            _ = stop.hard.cancelled() => break,
            (outcome, ()) = async { tokio::join!(write, read) } => outcome,
        };
        match outcome {
            Written::Finished => break,
            Written::Broken => {
                debug!("connection broken while streaming");
                DriveHandle::add(&counters.errors);
                if backoff(&config, &stop).await {
                    break;
                }
            }
        }
    }
    result
}

/// What one SINK holds against what the DRIVER expected of it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Delivery {
    /// Messages received, duplicates included.
    pub received: u64,
    /// Distinct control ids received.
    pub unique: u64,
    /// Expected control ids (ACKed, or sent without ACKs) never received.
    pub missing: u64,
    /// Received more than once (at-least-once resends after a reconnect or
    /// an engine restart): allowed, and counted.
    pub duplicates: u64,
}

/// How often [`await_delivery`] looks at the SINKs.
const DELIVERY_POLL: Duration = Duration::from_millis(100);

/// Waits until every SINK holds every `expected` control id, or until no
/// SINK received anything for `patience` (what is still missing then is
/// lost, or stuck), and reports each SINK. An engine that ACKs once a
/// message is queued may still be delivering when the DRIVER stops.
pub async fn await_delivery(
    sinks: &[SinkHandle],
    expected: &[String],
    patience: Duration,
) -> Vec<Delivery> {
    let mut last_total = u64::MAX;
    let mut last_change = Instant::now();
    loop {
        let total: u64 = sinks.iter().map(SinkHandle::received).sum();
        if total != last_total {
            last_total = total;
            last_change = Instant::now();
        }
        // Cheap test first: a SINK short of distinct ids is still waiting.
        let maybe_complete = sinks
            .iter()
            .all(|s| s.unique_received() >= expected.len() as u64);
        let report: Option<Vec<Delivery>> = (maybe_complete || last_change.elapsed() >= patience)
            .then(|| sinks.iter().map(|s| delivery(s, expected)).collect());
        match report {
            Some(r) if r.iter().all(|d| d.missing == 0) => return r,
            Some(r) if last_change.elapsed() >= patience => return r,
            _ => sleep(DELIVERY_POLL).await,
        }
    }
}

fn delivery(sink: &SinkHandle, expected: &[String]) -> Delivery {
    let ids = sink.ids();
    let missing = expected.iter().filter(|id| !ids.contains(*id)).count() as u64;
    let unique = ids.len() as u64;
    drop(ids);
    let received = sink.received();
    Delivery {
        received,
        unique,
        missing,
        duplicates: received.saturating_sub(unique),
    }
}
