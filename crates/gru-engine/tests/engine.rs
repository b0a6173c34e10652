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
    DriveConfig, DriveHandle, DriveSummary, SinkConfig, SinkHandle, SinkSummary, run_drive,
    run_sink,
};
use gru_engine::hl7::{AckCode, Msh, parse_ack};
use gru_engine::mllp::{DEFAULT_MAX_FRAME_BYTES, MllpCodec};
use gru_engine::{EngineConfig, EngineHandle, EngineStatus};
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
        let addr = listener.local_addr().expect("sink addr");
        let stats = SinkHandle::new();
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
        let config = DriveConfig {
            target,
            rate: None,
            duration,
            connections,
            seed: 42,
            message_bytes: 600,
            reconnect_backoff: Duration::from_millis(20),
        };
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
        let (_, code, _) = exchange(&mut c, Bytes::from_static(b"PID|1||garbage\r")).await;
        assert_eq!(code, AckCode::AR);
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
