//! The engine, DRIVER and SINK over real loopback sockets.
//!
//! Every test runs under [`within`], so a hang fails in seconds, and waits on
//! conditions with deadlines rather than sleeping.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use gru_engine::bench::{
    DriveConfig, DriveHandle, DriveSummary, SinkConfig, SinkHandle, SinkSummary, await_delivery,
    run_drive, run_sink,
};
use gru_engine::hl7::{AckCode, Msh, parse_ack};
use gru_engine::mllp::{DEFAULT_MAX_FRAME_BYTES, MllpCodec};
use gru_engine::routes::{t2_routes, t4_routes};
use gru_engine::synth::{MAX_MESSAGE_BYTES, Mix};
use gru_engine::{AckMode, EngineConfig, EngineHandle, EngineStatus};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

const TEST_TIMEOUT: Duration = Duration::from_secs(40);

async fn within<F: Future>(f: F) -> F::Output {
    timeout(TEST_TIMEOUT, f).await.expect("test timed out")
}

/// Polls `cond` until it holds, failing after `limit`.
async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

struct Sink {
    addr: SocketAddr,
    stats: SinkHandle,
    stop: CancellationToken,
    task: JoinHandle<SinkSummary>,
}

impl Sink {
    async fn start(ack_delay: Duration) -> Sink {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind sink");
        Self::start_on(listener, ack_delay)
    }

    fn start_on(listener: TcpListener, ack_delay: Duration) -> Sink {
        Self::start_with(listener, ack_delay, SinkHandle::new())
    }

    /// A sink that keeps every payload, to check what routes delivered.
    async fn capturing() -> Sink {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind sink");
        Self::start_with(listener, Duration::ZERO, SinkHandle::capturing())
    }

    fn start_with(listener: TcpListener, ack_delay: Duration, stats: SinkHandle) -> Sink {
        let addr = listener.local_addr().expect("sink addr");
        let stop = CancellationToken::new();
        let config = SinkConfig {
            ack_delay,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
        };
        let task = tokio::spawn(run_sink(
            listener,
            config,
            stats.clone(),
            stop.clone().cancelled_owned(),
        ));
        let task = tokio::spawn(async move { task.await.expect("sink task").expect("sink run") });
        Sink {
            addr,
            stats,
            stop,
            task,
        }
    }

    async fn stop(self) -> SinkSummary {
        self.stop.cancel();
        self.task.await.expect("sink summary")
    }
}

fn engine_config(downstream: SocketAddr) -> EngineConfig {
    EngineConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        downstream,
        max_connection_age: Duration::ZERO,
        forwarders: 4,
        downstream_timeout: Duration::from_secs(5),
        ..EngineConfig::default()
    }
}

struct Drive {
    live: DriveHandle,
    stop: CancellationToken,
    task: JoinHandle<DriveSummary>,
}

impl Drive {
    fn start(target: SocketAddr, connections: usize, duration: Duration) -> Drive {
        Self::start_with(DriveConfig {
            target,
            rate: None,
            duration,
            connections,
            seed: 42,
            message_bytes: 600,
            reconnect_backoff: Duration::from_millis(20),
            ..DriveConfig::default()
        })
    }

    fn start_with(config: DriveConfig) -> Drive {
        let live = DriveHandle::new();
        let stop = CancellationToken::new();
        let task = tokio::spawn(run_drive(
            config,
            live.clone(),
            stop.clone().cancelled_owned(),
        ));
        let task = tokio::spawn(async move { task.await.expect("drive task").expect("drive run") });
        Drive { live, stop, task }
    }

    async fn finish(self) -> DriveSummary {
        self.task.await.expect("drive summary")
    }

    async fn stop(self) -> DriveSummary {
        self.stop.cancel();
        self.finish().await
    }
}

/// Every control id the driver saw ACKed reached the sink.
fn assert_no_loss(summary: &DriveSummary, sink: &SinkHandle) {
    assert_eq!(summary.acked as usize, summary.acked_control_ids.len());
    let received: std::collections::HashSet<String> = sink.control_ids().into_iter().collect();
    let missing: Vec<&String> = summary
        .acked_control_ids
        .iter()
        .filter(|id| !received.contains(*id))
        .collect();
    assert!(missing.is_empty(), "acked but never delivered: {missing:?}");
    assert!(sink.received() >= summary.acked);
}

type Client = Framed<TcpStream, MllpCodec>;

async fn client(addr: SocketAddr) -> Client {
    let socket = TcpStream::connect(addr).await.expect("connect");
    Framed::new(socket, MllpCodec::new(DEFAULT_MAX_FRAME_BYTES))
}

fn adt(control_id: &str) -> Bytes {
    Bytes::from(format!(
        "MSH|^~\\&|SENDAPP|SENDFAC|RECVAPP|RECVFAC|20240101120000||ADT^A01^ADT_A01|{control_id}|P|2.5.1\rEVN|A01|20240101120000\rPID|1||123^^^SYNTH^MR||DOE^JANE\r"
    ))
}

/// Sends one message and returns the ACK's MSH and MSA-1/2.
async fn exchange(client: &mut Client, message: Bytes) -> (Msh, AckCode, String) {
    client.send(message).await.expect("send");
    let reply = client
        .next()
        .await
        .expect("connection closed before ack")
        .expect("read ack");
    let msh = Msh::parse(&reply).expect("ack msh");
    let (code, acked) = parse_ack(&reply).expect("ack msa");
    (msh, code, acked)
}

/// True once the server has closed the connection.
async fn closed_by_server(client: &mut Client) -> bool {
    matches!(client.next().await, None | Some(Err(_)))
}

async fn stop_engine(engine: &EngineHandle) {
    engine.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_through_loses_nothing() {
    within(async {
        let sink = Sink::start(Duration::ZERO).await;
        let engine = gru_engine::start(engine_config(sink.addr))
            .await
            .expect("start engine");
        assert!(engine.status().healthy);
        let summary = Drive::start(engine.local_addr(), 4, Duration::from_millis(800))
            .finish()
            .await;
        assert!(summary.acked > 0, "{summary:?}");
        assert_eq!(summary.nacked, 0);
        assert_eq!(summary.sent, summary.acked, "{summary:?}");
        assert!(summary.latency_max_ms >= summary.latency_p50_ms);
        assert_no_loss(&summary, &sink.stats);
        let status = engine.status();
        assert_eq!(status.processed, summary.acked);
        assert_eq!(status.failed, 0);
        stop_engine(&engine).await;
        assert!(!engine.status().healthy);
        let sink_summary = sink.stop().await;
        assert_eq!(sink_summary.unique, summary.acked);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_closes_connections_at_message_boundaries() {
    within(async {
        // A slow downstream, so a message is reliably mid-delivery.
        let sink = Sink::start(Duration::from_millis(150)).await;
        let engine = gru_engine::start(engine_config(sink.addr))
            .await
            .expect("start engine");
        let drive = Drive::start(engine.local_addr(), 4, Duration::from_secs(30));
        let mut idle = client(engine.local_addr()).await;
        let mut busy = client(engine.local_addr()).await;
        wait_until("driver traffic", Duration::from_secs(10), || {
            drive.live.acked() >= 4 && engine.status().open_connections == 6
        })
        .await;

        // Mid-delivery: the sink has it and is sitting on its ACK.
        busy.send(adt("MID-1")).await.expect("send");
        wait_until("MID-1 at the sink", Duration::from_secs(10), || {
            sink.stats.contains("MID-1")
        })
        .await;
        engine.drain();
        engine.drain(); // idempotent
        assert!(engine.status().draining);

        let reply = busy
            .next()
            .await
            .expect("ack before close")
            .expect("read ack");
        assert_eq!(
            parse_ack(&reply).expect("ack"),
            (AckCode::AA, "MID-1".to_owned()),
            "the message in hand was finished, not cut"
        );
        assert!(closed_by_server(&mut busy).await, "closed after its ack");
        assert!(closed_by_server(&mut idle).await, "idle connection closed");

        timeout(Duration::from_secs(10), engine.drained())
            .await
            .expect("drained in time");
        let status = engine.status();
        assert_eq!(
            status,
            EngineStatus {
                queue_depth: 0,
                in_flight: 0,
                open_connections: 0,
                healthy: true,
                draining: true,
                drained: true,
                ..status
            }
        );

        // New connections are closed at once while draining.
        let mut late = client(engine.local_addr()).await;
        assert!(closed_by_server(&mut late).await);

        let summary = drive.stop().await;
        assert!(summary.reconnects >= 4, "{summary:?}");
        assert_no_loss(&summary, &sink.stats);
        assert_eq!(engine.status().open_connections, 0);

        // Resume serves again.
        engine.resume();
        assert!(!engine.status().draining);
        let mut again = client(engine.local_addr()).await;
        let (_, code, acked) = exchange(&mut again, adt("AFTER-RESUME")).await;
        assert_eq!((code, acked.as_str()), (AckCode::AA, "AFTER-RESUME"));
        drop(again);
        stop_engine(&engine).await;
        sink.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_with_partial_frame_in_hand_finishes_it() {
    within(async {
        let sink = Sink::start(Duration::from_millis(200)).await;
        let engine = gru_engine::start(engine_config(sink.addr))
            .await
            .expect("start engine");
        let mut socket = TcpStream::connect(engine.local_addr())
            .await
            .expect("connect");
        // One write carrying a whole message and the first half of the next:
        // the engine reads both at once, so while it delivers FIRST the half
        // of SECOND sits in its read buffer — a message in hand.
        let mut wire = gru_engine::mllp::frame(&adt("FIRST"));
        let second = gru_engine::mllp::frame(&adt("SECOND"));
        let (head, tail) = second.split_at(second.len() / 2);
        wire.extend_from_slice(head);
        socket.write_all(&wire).await.expect("write");
        wait_until("FIRST at the sink", Duration::from_secs(10), || {
            sink.stats.contains("FIRST")
        })
        .await;
        engine.drain();

        let mut framed = Framed::new(socket, MllpCodec::new(DEFAULT_MAX_FRAME_BYTES));
        let reply = framed.next().await.expect("ack").expect("read ack");
        assert_eq!(
            parse_ack(&reply).expect("ack"),
            (AckCode::AA, "FIRST".to_owned())
        );
        // Still open: the engine waits for the rest of SECOND.
        assert_eq!(engine.status().open_connections, 1);
        framed.get_mut().write_all(tail).await.expect("write rest");
        let reply = framed.next().await.expect("ack").expect("read ack");
        assert_eq!(
            parse_ack(&reply).expect("ack"),
            (AckCode::AA, "SECOND".to_owned())
        );
        assert!(closed_by_server(&mut framed).await, "closed after SECOND");
        timeout(Duration::from_secs(10), engine.drained())
            .await
            .expect("drained in time");
        stop_engine(&engine).await;
        sink.stop().await;
    })
    .await;
}

/// Sends one message; `None` when the server closed the connection first.
async fn try_exchange(client: &mut Client, message: Bytes) -> Option<AckCode> {
    client.send(message).await.ok()?;
    let reply = client.next().await?.ok()?;
    parse_ack(&reply).ok().map(|(code, _)| code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shed_closes_idle_connections_first_and_busy_ones_only_after_their_ack() {
    within(async {
        // A slow downstream, so a message is reliably mid-delivery.
        let sink = Sink::start(Duration::from_millis(300)).await;
        let engine = gru_engine::start(engine_config(sink.addr))
            .await
            .expect("start engine");
        let mut idle = Vec::new();
        for _ in 0..3 {
            idle.push(client(engine.local_addr()).await);
        }
        let mut busy = client(engine.local_addr()).await;
        wait_until("four connections", Duration::from_secs(10), || {
            engine.status().open_connections == 4
        })
        .await;
        busy.send(adt("MID-1")).await.expect("send");
        wait_until("MID-1 at the sink", Duration::from_secs(10), || {
            sink.stats.contains("MID-1")
        })
        .await;

        assert_eq!(engine.shed(2), 2);
        wait_until("two idle connections shed", Duration::from_secs(10), || {
            engine.status().open_connections == 2
        })
        .await;
        // The busy one finished its message and stays: the idle ones went
        // first.
        let reply = busy.next().await.expect("ack").expect("read ack");
        assert_eq!(
            parse_ack(&reply).expect("ack"),
            (AckCode::AA, "MID-1".to_owned())
        );
        assert_eq!(
            try_exchange(&mut busy, adt("AFTER-1")).await,
            Some(AckCode::AA),
            "the busy connection was not shed"
        );
        let mut served = 0;
        for (i, c) in idle.iter_mut().enumerate() {
            if try_exchange(c, adt(&format!("IDLE-{i}"))).await.is_some() {
                served += 1;
            }
        }
        assert_eq!(served, 1, "two of the three idle connections were closed");
        assert!(!engine.status().draining, "shedding is not draining");

        // More than are open: each open one closes, the busy one only after
        // its ACK, and new connections are served as before.
        busy.send(adt("MID-2")).await.expect("send");
        wait_until("MID-2 at the sink", Duration::from_secs(10), || {
            sink.stats.contains("MID-2")
        })
        .await;
        assert_eq!(engine.shed(10), 2);
        let reply = busy.next().await.expect("ack").expect("read ack");
        assert_eq!(
            parse_ack(&reply).expect("ack"),
            (AckCode::AA, "MID-2".to_owned()),
            "the message in hand was finished, not cut"
        );
        assert!(closed_by_server(&mut busy).await, "closed after its ack");
        wait_until("every connection shed", Duration::from_secs(10), || {
            engine.status().open_connections == 0
        })
        .await;
        let mut fresh = client(engine.local_addr()).await;
        assert_eq!(
            try_exchange(&mut fresh, adt("FRESH")).await,
            Some(AckCode::AA),
            "a request is for the connections open when it came"
        );
        drop(fresh);
        stop_engine(&engine).await;
        sink.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shedding_under_load_reconnects_without_loss() {
    within(async {
        let sink = Sink::start(Duration::ZERO).await;
        let engine = gru_engine::start(engine_config(sink.addr))
            .await
            .expect("start engine");
        let drive = Drive::start(engine.local_addr(), 4, Duration::from_secs(30));
        wait_until("driver traffic", Duration::from_secs(10), || {
            drive.live.acked() >= 20 && engine.status().open_connections == 4
        })
        .await;
        let before = drive.live.acked();
        assert_eq!(engine.shed(3), 3);
        wait_until("traffic after the shed", Duration::from_secs(10), || {
            drive.live.acked() >= before + 100
        })
        .await;
        let summary = drive.stop().await;
        assert!(summary.reconnects >= 3, "{summary:?}");
        assert_eq!(summary.nacked, 0, "{summary:?}");
        assert_no_loss(&summary, &sink.stats);
        stop_engine(&engine).await;
        sink.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connection_age_reconnects_without_loss() {
    within(async {
        let sink = Sink::start(Duration::ZERO).await;
        let config = EngineConfig {
            max_connection_age: Duration::from_millis(200),
            ..engine_config(sink.addr)
        };
        let engine = gru_engine::start(config).await.expect("start engine");
        let summary = Drive::start(engine.local_addr(), 3, Duration::from_millis(1500))
            .finish()
            .await;
        assert!(summary.reconnects > 0, "{summary:?}");
        assert!(summary.acked > 0);
        assert_eq!(summary.nacked, 0);
        assert_no_loss(&summary, &sink.stats);
        stop_engine(&engine).await;
        sink.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connection_closes_after_max_age() {
    within(async {
        let sink = Sink::start(Duration::ZERO).await;
        let config = EngineConfig {
            max_connection_age: Duration::from_millis(100),
            ..engine_config(sink.addr)
        };
        let engine = gru_engine::start(config).await.expect("start engine");
        let mut idle = client(engine.local_addr()).await;
        let started = Instant::now();
        assert!(closed_by_server(&mut idle).await);
        assert!(started.elapsed() >= Duration::from_millis(90));
        wait_until("connection uncounted", Duration::from_secs(5), || {
            engine.status().open_connections == 0
        })
        .await;
        stop_engine(&engine).await;
        sink.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downstream_down_then_up_queues_then_delivers() {
    within(async {
        // Reserve a port for the sink, then leave it closed for now.
        let reserved = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let sink_addr = reserved.local_addr().expect("addr");
        drop(reserved);

        let engine = gru_engine::start(engine_config(sink_addr))
            .await
            .expect("start engine");
        let drive = Drive::start(engine.local_addr(), 3, Duration::from_millis(500));
        wait_until("messages queued", Duration::from_secs(10), || {
            engine.status().queue_depth == 3
        })
        .await;
        let status = engine.status();
        assert_eq!((status.in_flight, status.processed), (0, 0));
        assert_eq!(drive.live.acked(), 0);

        let listener = TcpListener::bind(sink_addr)
            .await
            .expect("rebind sink port");
        let sink = Sink::start_on(listener, Duration::ZERO);
        let summary = drive.finish().await;
        assert!(summary.acked >= 3, "{summary:?}");
        assert_eq!(summary.nacked, 0);
        assert_no_loss(&summary, &sink.stats);
        assert_eq!(engine.status().failed, 0);
        stop_engine(&engine).await;
        sink.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frame_closes_only_its_connection() {
    within(async {
        let sink = Sink::start(Duration::ZERO).await;
        let config = EngineConfig {
            max_frame_bytes: 1024,
            ..engine_config(sink.addr)
        };
        let engine = gru_engine::start(config).await.expect("start engine");
        let mut good = client(engine.local_addr()).await;
        let (_, code, _) = exchange(&mut good, adt("BEFORE")).await;
        assert_eq!(code, AckCode::AA);

        let mut bad = TcpStream::connect(engine.local_addr())
            .await
            .expect("connect");
        let mut wire = vec![0x0B];
        wire.extend(std::iter::repeat_n(b'x', 4096));
        // The engine may close while we are still writing.
        let _ = bad.write_all(&wire).await;
        let mut buf = [0u8; 64];
        let n = bad.read(&mut buf).await.unwrap_or(0);
        assert_eq!(
            n, 0,
            "oversized frame must close the connection, not answer"
        );

        let (_, code, acked) = exchange(&mut good, adt("AFTER")).await;
        assert_eq!((code, acked.as_str()), (AckCode::AA, "AFTER"));
        let mut fresh = client(engine.local_addr()).await;
        let (_, code, _) = exchange(&mut fresh, adt("FRESH")).await;
        assert_eq!(code, AckCode::AA);
        assert!(engine.status().healthy);
        drop((good, fresh));
        stop_engine(&engine).await;
        sink.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_follows_design() {
    within(async {
        let sink = Sink::start(Duration::ZERO).await;
        let engine = gru_engine::start(engine_config(sink.addr))
            .await
            .expect("start engine");
        let mut c = client(engine.local_addr()).await;
        let (msh, code, acked) = exchange(&mut c, adt("CTRL-42")).await;
        assert_eq!(code, AckCode::AA);
        assert_eq!(acked, "CTRL-42", "MSA-2 is the inbound MSH-10");
        assert_eq!(msh.sending_application, "RECVAPP");
        assert_eq!(msh.sending_facility, "RECVFAC");
        assert_eq!(msh.receiving_application, "SENDAPP");
        assert_eq!(msh.receiving_facility, "SENDFAC");
        assert_eq!(
            (msh.message_code.as_str(), msh.trigger_event.as_str()),
            ("ACK", "A01")
        );
        assert_ne!(msh.control_id, "CTRL-42", "the ACK has its own MSH-10");
        assert_eq!(msh.processing_id, "P");
        assert_eq!(msh.version, "2.5.1");
        assert!(sink.stats.contains("CTRL-42"), "acked after delivery");

        // A message without a readable MSH is refused, and the connection
        // stays usable.
        c.send(Bytes::from_static(b"PID|1||garbage\r"))
            .await
            .expect("send");
        let reply = c.next().await.expect("an answer").expect("read");
        assert_eq!(parse_ack(&reply).expect("ack").0, AckCode::AR);
        let reply = String::from_utf8_lossy(&reply);
        // HL7 table 0357: 100 = segment sequence error (no MSH first).
        assert!(reply.contains("\rERR|||100^"), "{reply:?}");
        let (_, code, acked) = exchange(&mut c, adt("CTRL-43")).await;
        assert_eq!((code, acked.as_str()), (AckCode::AA, "CTRL-43"));
        drop(c);
        stop_engine(&engine).await;
        sink.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downstream_nack_becomes_ae_after_max_attempts() {
    within(async {
        // A downstream that refuses everything with AE.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let refuser = tokio::spawn(async move {
            let mut tries = 0u32;
            let (socket, _) = listener.accept().await.expect("accept");
            let mut framed = Framed::new(socket, MllpCodec::default());
            while let Some(Ok(msg)) = framed.next().await {
                tries += 1;
                let msh = Msh::parse(&msg).expect("msh");
                let ack = gru_engine::hl7::build_ack(&msh, AckCode::AE, "R", Some("no"));
                framed.send(Bytes::from(ack)).await.expect("send");
                if tries == 3 {
                    break;
                }
            }
            tries
        });
        let config = EngineConfig {
            forwarders: 1,
            max_attempts: 3,
            ..engine_config(addr)
        };
        let engine = gru_engine::start(config).await.expect("start engine");
        let mut c = client(engine.local_addr()).await;
        let (_, code, acked) = exchange(&mut c, adt("DOOMED")).await;
        assert_eq!((code, acked.as_str()), (AckCode::AE, "DOOMED"));
        assert_eq!(refuser.await.expect("refuser"), 3);
        let status = engine.status();
        assert_eq!((status.failed, status.processed), (1, 0));
        drop(c);
        stop_engine(&engine).await;
    })
    .await;
}

/// The `seg`-`field` value of the first `seg` segment (MSH counted as in the
/// standard: MSH-3 is the third field).
fn field(message: &[u8], seg: &str, n: usize) -> String {
    let text = String::from_utf8_lossy(message);
    let segment = text
        .split('\r')
        .find(|s| s.starts_with(seg))
        .unwrap_or_default();
    let index = if seg == "MSH" { n - 1 } else { n };
    segment.split('|').nth(index).unwrap_or_default().to_owned()
}

/// What every message delivered through `example_transform(facility)` looks
/// like at its sink.
fn assert_transformed(sink: &Sink, facility: &str) {
    let captured = sink.stats.captured();
    assert!(!captured.is_empty(), "{facility}: sink got nothing");
    for m in &captured {
        let text = String::from_utf8_lossy(m);
        assert_eq!(field(m, "MSH", 6), facility, "{text}");
        assert_eq!(field(m, "MSH", 3), field(m, "MSH", 4), "{text}");
        assert!(
            ["female", "male", "unknown", "other"].contains(&field(m, "PID", 8).as_str()),
            "{text}"
        );
        let name = field(m, "PID", 5);
        assert!(
            name.ends_with('^') || !name.contains('^'),
            "given name cleared: {text}"
        );
        assert!(!text.contains("\rNTE|"), "notes dropped: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t2_delivers_transformed_messages_to_both_destinations() {
    within(async {
        let sinks = [Sink::capturing().await, Sink::capturing().await];
        let config = EngineConfig {
            routes: t2_routes([sinks[0].addr, sinks[1].addr]),
            ..engine_config(sinks[0].addr)
        };
        let engine = gru_engine::start(config).await.expect("start engine");
        let summary = Drive::start(engine.local_addr(), 3, Duration::from_millis(600))
            .finish()
            .await;
        assert!(summary.acked > 0, "{summary:?}");
        assert_eq!((summary.nacked, summary.sent), (0, summary.acked));
        for sink in &sinks {
            assert_no_loss(&summary, &sink.stats);
            assert_transformed(sink, "T2");
        }
        let status = engine.status();
        assert_eq!((status.processed, status.failed), (summary.acked, 0));
        stop_engine(&engine).await;
        for sink in sinks {
            sink.stop().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t4_delivers_each_routes_transform_to_all_five_destinations() {
    within(async {
        let mut sinks = Vec::new();
        for _ in 0..5 {
            sinks.push(Sink::capturing().await);
        }
        let addrs: Vec<SocketAddr> = sinks.iter().map(|s| s.addr).collect();
        let config = EngineConfig {
            routes: t4_routes(addrs.clone().try_into().expect("five")),
            forwarders: 2,
            ..engine_config(addrs[0])
        };
        let engine = gru_engine::start(config).await.expect("start engine");
        let summary = Drive::start(engine.local_addr(), 3, Duration::from_millis(600))
            .finish()
            .await;
        assert!(summary.acked > 0, "{summary:?}");
        assert_eq!((summary.nacked, summary.sent), (0, summary.acked));
        let facilities = ["T4R1", "T4R2", "T4R3", "T4R4", "T4R4"];
        for (sink, facility) in sinks.iter().zip(facilities) {
            assert_no_loss(&summary, &sink.stats);
            assert_transformed(sink, facility);
        }
        stop_engine(&engine).await;
        for sink in sinks {
            sink.stop().await;
        }
    })
    .await;
}

/// A port nothing listens on yet.
async fn reserved_addr() -> SocketAddr {
    let reserved = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    reserved.local_addr().expect("addr")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_enqueue_acks_before_delivery_and_drain_waits_for_the_queue() {
    within(async {
        let sink_addr = reserved_addr().await;
        let config = EngineConfig {
            ack_mode: AckMode::AfterEnqueue,
            ..engine_config(sink_addr)
        };
        let engine = gru_engine::start(config).await.expect("start engine");
        let mut c = client(engine.local_addr()).await;
        // Downstream is down, yet the sender gets AA at once.
        let (_, code, acked) = exchange(&mut c, adt("EARLY-1")).await;
        assert_eq!((code, acked.as_str()), (AckCode::AA, "EARLY-1"));
        assert_eq!(engine.status().queue_depth, 1);
        drop(c);
        engine.drain();
        wait_until("connection closed", Duration::from_secs(5), || {
            engine.status().open_connections == 0
        })
        .await;
        assert!(!engine.status().drained, "a queued message holds the drain");

        let listener = TcpListener::bind(sink_addr).await.expect("rebind sink");
        let sink = Sink::start_on(listener, Duration::ZERO);
        timeout(Duration::from_secs(10), engine.drained())
            .await
            .expect("drained once delivered");
        assert!(sink.stats.contains("EARLY-1"));
        assert_eq!(engine.status().processed, 1);
        stop_engine(&engine).await;
        sink.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_enqueue_reports_a_downstream_refusal_as_failed() {
    within(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let refuser = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.expect("accept");
            let mut framed = Framed::new(socket, MllpCodec::default());
            let mut tries = 0u32;
            while let Some(Ok(msg)) = framed.next().await {
                tries += 1;
                let msh = Msh::parse(&msg).expect("msh");
                let ack = gru_engine::hl7::build_ack(&msh, AckCode::AR, "R", Some("no"));
                framed.send(Bytes::from(ack)).await.expect("send");
                if tries == 2 {
                    break;
                }
            }
            tries
        });
        let config = EngineConfig {
            ack_mode: AckMode::AfterEnqueue,
            forwarders: 1,
            max_attempts: 2,
            ..engine_config(addr)
        };
        let engine = gru_engine::start(config).await.expect("start engine");
        let mut c = client(engine.local_addr()).await;
        let (_, code, _) = exchange(&mut c, adt("REFUSED")).await;
        assert_eq!(code, AckCode::AA, "acked on enqueue");
        assert_eq!(
            refuser.await.expect("refuser"),
            2,
            "retried up to the limit"
        );
        wait_until("failure reported", Duration::from_secs(5), || {
            engine.status().failed == 1
        })
        .await;
        assert_eq!(engine.status().processed, 0);
        drop(c);
        stop_engine(&engine).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ack_mode_answers_nothing_and_delivers_everything() {
    within(async {
        let sink = Sink::start(Duration::ZERO).await;
        let config = EngineConfig {
            ack_mode: AckMode::None,
            ..engine_config(sink.addr)
        };
        let engine = gru_engine::start(config).await.expect("start engine");
        let mut socket = TcpStream::connect(engine.local_addr())
            .await
            .expect("connect");
        let ids: Vec<String> = (0..20).map(|i| format!("NOACK-{i}")).collect();
        let mut wire = Vec::new();
        for id in &ids {
            wire.extend(gru_engine::mllp::frame(&adt(id)));
        }
        socket.write_all(&wire).await.expect("write");
        wait_until("all at the sink", Duration::from_secs(10), || {
            ids.iter().all(|id| sink.stats.contains(id))
        })
        .await;
        // Any ACK would have been written before the next frame was read,
        // so by now it would be waiting in our socket.
        let mut buf = [0u8; 64];
        match socket.try_read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("expected no ack, got {other:?}"),
        }
        wait_until("all processed", Duration::from_secs(5), || {
            engine.status().processed == 20
        })
        .await;
        drop(socket);
        stop_engine(&engine).await;
        sink.stop().await;
    })
    .await;
}

/// T4 without ACKs, as `gru bench suite` runs it: the DRIVER streams
/// without waiting, the engine answers nothing, and every message sent is
/// at all five SINKs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ack_driver_streams_t4_and_every_sink_gets_every_message() {
    within(async {
        let mut sinks = Vec::new();
        for _ in 0..5 {
            sinks.push(Sink::start(Duration::ZERO).await);
        }
        let addrs: Vec<SocketAddr> = sinks.iter().map(|s| s.addr).collect();
        let config = EngineConfig {
            routes: t4_routes(addrs.clone().try_into().expect("five")),
            ack_mode: AckMode::None,
            ..engine_config(addrs[0])
        };
        let engine = gru_engine::start(config).await.expect("start engine");
        let summary = Drive::start_with(DriveConfig {
            target: engine.local_addr(),
            rate: None,
            duration: Duration::from_millis(700),
            connections: 3,
            wait_for_ack: false,
            message_bytes: 600,
            ..DriveConfig::default()
        })
        .finish()
        .await;
        assert!(summary.sent > 50, "{summary:?}");
        assert_eq!((summary.acked, summary.errors), (0, 0), "{summary:?}");
        assert_eq!(summary.expected_at_sink().len() as u64, summary.sent);
        let handles: Vec<SinkHandle> = sinks.iter().map(|s| s.stats.clone()).collect();
        let delivered =
            await_delivery(&handles, summary.expected_at_sink(), Duration::from_secs(5)).await;
        for d in &delivered {
            assert_eq!((d.missing, d.unique), (0, summary.sent), "{d:?}");
        }
        stop_engine(&engine).await;
        for sink in sinks {
            sink.stop().await;
        }
    })
    .await;
}

/// A no-ACK DRIVER against an engine that ACKs anyway reads and discards
/// the ACKs (so neither side can stall on a full socket), and every message
/// still arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ack_driver_survives_an_engine_that_acks() {
    within(async {
        let sink = Sink::start(Duration::ZERO).await;
        let engine = gru_engine::start(engine_config(sink.addr))
            .await
            .expect("start engine");
        let summary = Drive::start_with(DriveConfig {
            target: engine.local_addr(),
            // This engine takes one message per connection at a time, so
            // open loop would bury it in socket buffers: stay within its pace.
            rate: Some(1000.0),
            duration: Duration::from_millis(800),
            connections: 2,
            wait_for_ack: false,
            message_bytes: 300,
            ..DriveConfig::default()
        })
        .finish()
        .await;
        assert!(summary.sent > 400, "{summary:?}");
        assert_eq!(summary.acked, 0, "ACKs are not awaited, so not counted");
        let delivered = await_delivery(
            std::slice::from_ref(&sink.stats),
            summary.expected_at_sink(),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(delivered[0].missing, 0, "{:?}", delivered[0]);
        stop_engine(&engine).await;
        sink.stop().await;
    })
    .await;
}

/// `await_delivery` reports what never arrived instead of waiting forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_check_counts_what_a_sink_never_got() {
    within(async {
        let sink = Sink::start(Duration::ZERO).await;
        let mut client = client(sink.addr).await;
        for id in ["HERE-1", "HERE-2", "HERE-2"] {
            exchange(&mut client, adt(id)).await;
        }
        let expected: Vec<String> = ["HERE-1", "HERE-2", "GONE-1"].map(str::to_owned).to_vec();
        let started = Instant::now();
        let d = await_delivery(
            std::slice::from_ref(&sink.stats),
            &expected,
            Duration::from_millis(300),
        )
        .await;
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(
            (d[0].received, d[0].unique, d[0].missing, d[0].duplicates),
            (3, 2, 1, 1)
        );
        drop(client);
        sink.stop().await;
    })
    .await;
}

/// The size knob's top end: 1 MiB messages of a chosen mix go through T1
/// byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mebibyte_messages_pass_through_intact() {
    within(async {
        let sink = Sink::capturing().await;
        let engine = gru_engine::start(engine_config(sink.addr))
            .await
            .expect("start engine");
        let summary = Drive::start_with(DriveConfig {
            target: engine.local_addr(),
            rate: Some(20.0),
            duration: Duration::from_millis(500),
            connections: 2,
            message_bytes: MAX_MESSAGE_BYTES,
            mix: "oru-r01".parse::<Mix>().expect("mix"),
            ..DriveConfig::default()
        })
        .finish()
        .await;
        assert!(summary.acked >= 2, "{summary:?}");
        assert_eq!((summary.nacked, summary.errors), (0, 0), "{summary:?}");
        assert_no_loss(&summary, &sink.stats);
        for payload in sink.stats.captured() {
            assert!(
                (MAX_MESSAGE_BYTES..MAX_MESSAGE_BYTES + 256).contains(&payload.len()),
                "{}",
                payload.len()
            );
            let msh = Msh::parse(&payload).expect("msh");
            assert_eq!(msh.message_code, "ORU");
        }
        stop_engine(&engine).await;
        sink.stop().await;
    })
    .await;
}

#[tokio::test]
async fn drive_refuses_messages_over_one_mebibyte() {
    let config = DriveConfig {
        message_bytes: MAX_MESSAGE_BYTES + 1,
        ..DriveConfig::default()
    };
    let err = run_drive(config, DriveHandle::new(), std::future::ready(()))
        .await
        .expect_err("too big");
    assert!(err.to_string().contains("at most 1 MiB"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_queue_survives_a_crash_mid_load() {
    within(async {
        let dir = tempfile::tempdir().expect("tempdir");
        // A slow sink and one forwarder, so a backlog builds behind the ACKs.
        let sink = Sink::start(Duration::from_millis(3)).await;
        let config = EngineConfig {
            ack_mode: AckMode::AfterEnqueue,
            queue_dir: Some(dir.path().to_owned()),
            forwarders: 1,
            ..engine_config(sink.addr)
        };
        let engine = gru_engine::start(config.clone())
            .await
            .expect("start engine");
        let addr = engine.local_addr();
        let drive = Drive::start(addr, 4, Duration::from_secs(3));
        wait_until("a backlog", Duration::from_secs(15), || {
            drive.live.acked() >= 200 && engine.status().queue_depth >= 50
        })
        .await;
        // The crash: every task aborted in this process, unsynced log buffer
        // dropped. (In-process, so the page cache survives, as with kill -9.)
        engine.abort().await;
        let acked_before = drive.live.acked();
        let at_sink_before = sink.stats.unique_received();
        assert!(at_sink_before < acked_before, "crashed with a backlog");

        // Restart on the same directory and address; the driver reconnects.
        let restarted = gru_engine::start(EngineConfig {
            listen: addr,
            forwarders: 4,
            ..config
        })
        .await
        .expect("restart engine");
        // No new messages: resend what was not ACKed, then finish.
        let summary = drive.stop().await;
        assert!(summary.acked >= acked_before, "{summary:?}");
        restarted.drain();
        timeout(Duration::from_secs(20), restarted.drained())
            .await
            .expect("replayed backlog delivered");
        assert_no_loss(&summary, &sink.stats);
        let duplicates = sink.stats.received() - sink.stats.unique_received();
        println!(
            "crash test: acked {} ({} before the crash, {} at the sink then), duplicates {}",
            summary.acked, acked_before, at_sink_before, duplicates
        );
        stop_engine(&restarted).await;
        sink.stop().await;
        // Everything delivered: the log restarts empty.
        let reopened = gru_engine::wal::Wal::open(dir.path(), 1 << 20).expect("reopen");
        assert!(
            reopened.pending.is_empty(),
            "{} pending",
            reopened.pending.len()
        );
        reopened.wal.close(true);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_limit_pushes_back_on_senders() {
    within(async {
        let sink_addr = reserved_addr().await;
        let config = EngineConfig {
            ack_mode: AckMode::AfterEnqueue,
            max_queued_messages: 2,
            ..engine_config(sink_addr)
        };
        let engine = gru_engine::start(config).await.expect("start engine");
        let mut c = client(engine.local_addr()).await;
        for id in ["HELD-1", "HELD-2"] {
            let (_, code, _) = exchange(&mut c, adt(id)).await;
            assert_eq!(code, AckCode::AA);
        }
        // The third waits for room: no ACK while downstream is down.
        c.send(adt("HELD-3")).await.expect("send");
        assert!(
            timeout(Duration::from_millis(300), c.next()).await.is_err(),
            "no ack while the queue is full"
        );
        assert_eq!(engine.status().queue_depth, 2);
        let listener = TcpListener::bind(sink_addr).await.expect("rebind sink");
        let sink = Sink::start_on(listener, Duration::ZERO);
        let reply = c.next().await.expect("ack").expect("read ack");
        assert_eq!(
            parse_ack(&reply).expect("ack"),
            (AckCode::AA, "HELD-3".to_owned())
        );
        wait_until("all delivered", Duration::from_secs(10), || {
            engine.status().processed == 3
        })
        .await;
        drop(c);
        stop_engine(&engine).await;
        sink.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_restart_resends_only_to_destinations_still_missing_it() {
    within(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let up = Sink::start(Duration::ZERO).await;
        let down_addr = reserved_addr().await;
        let config = EngineConfig {
            ack_mode: AckMode::AfterEnqueue,
            queue_dir: Some(dir.path().to_owned()),
            routes: t2_routes([up.addr, down_addr]),
            ..engine_config(up.addr)
        };
        let engine = gru_engine::start(config.clone())
            .await
            .expect("start engine");
        let mut c = client(engine.local_addr()).await;
        let (_, code, _) = exchange(&mut c, adt("HALF-DONE")).await;
        assert_eq!(code, AckCode::AA);
        wait_until(
            "delivered to the live sink",
            Duration::from_secs(10),
            || up.stats.contains("HALF-DONE"),
        )
        .await;
        drop(c);
        // Grace runs out with the second destination still down.
        engine.shutdown(Duration::from_millis(200)).await;

        let listener = TcpListener::bind(down_addr).await.expect("rebind");
        let late = Sink::start_on(listener, Duration::ZERO);
        let restarted = gru_engine::start(config).await.expect("restart");
        restarted.drain();
        timeout(Duration::from_secs(10), restarted.drained())
            .await
            .expect("replayed");
        assert!(late.stats.contains("HALF-DONE"));
        assert_eq!(up.stats.received(), 1, "no duplicate where it was done");
        assert_eq!(restarted.status().processed, 1);
        stop_engine(&restarted).await;
        up.stop().await;
        late.stop().await;
    })
    .await;
}

// A real kill -9 of a durable engine is tested end to end with the `gru`
// binary (tests/e2e/durable.rs): the process dies, the write-ahead log stays.
