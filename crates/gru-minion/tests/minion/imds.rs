//! The IMDSv2 client against a small stub of the instance metadata service:
//! real HTTP over loopback. The stub behaves like the real service with
//! `HttpTokens: required`: the token PUT needs the TTL header, every GET
//! needs a token it issued (401 otherwise), unknown paths answer 404.
//!
//! The last scenarios run the minion as `gru minion` does
//! ([`gru_minion::run_service`]) with `[aws] imds = true` pointed at the
//! stub, a listener that stands in for the controller and counts
//! connections (no connection, so no Join), and a unix datagram socket as
//! the service manager's notification socket.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use gru_minion::MinionConfig;
use gru_minion::imds::{
    Imds, ImdsError, InstanceIdentity, NeverInService, TargetLifecycleState, WarmedState,
    wait_until_in_service,
};
use gru_minion::sd_notify::Notifier;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, UnixDatagram};

const LIFECYCLE: &str = "/latest/meta-data/autoscaling/target-lifecycle-state";

#[derive(Default)]
struct Stub {
    paths: HashMap<String, String>,
    /// Answers for the lifecycle path, one per request; the last repeats.
    lifecycle: Vec<String>,
    lifecycle_reads: usize,
    tokens: Vec<String>,
    token_puts: usize,
    /// GETs that came without a token: IMDSv1. Must stay 0.
    tokenless_gets: usize,
    /// TTLs the client asked for.
    ttls: Vec<String>,
    /// Paths of the GETs answered with a token.
    gets: Vec<String>,
}

type Shared = Arc<Mutex<Stub>>;

async fn serve(listener: TcpListener, stub: Shared) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let stub = stub.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let stub = stub.clone();
                async move { Ok::<_, Infallible>(answer(&stub, req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn reply(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_owned())));
    *r.status_mut() = status;
    r
}

fn answer(stub: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let mut s = stub.lock().unwrap();
    let path = req.uri().path().to_owned();
    if req.method() == hyper::Method::PUT && path == "/latest/api/token" {
        let Some(ttl) = req.headers().get("x-aws-ec2-metadata-token-ttl-seconds") else {
            return reply(StatusCode::BAD_REQUEST, "missing TTL header");
        };
        let ttl = ttl.to_str().unwrap_or("").to_owned();
        match ttl.parse::<u64>() {
            Ok(1..=21600) => {}
            _ => return reply(StatusCode::BAD_REQUEST, "bad TTL"),
        }
        s.ttls.push(ttl);
        s.token_puts += 1;
        let token = format!("token-{}", s.token_puts);
        s.tokens.push(token.clone());
        return reply(StatusCode::OK, &token);
    }
    if req.method() != hyper::Method::GET {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "");
    }
    let token = req
        .headers()
        .get("x-aws-ec2-metadata-token")
        .and_then(|v| v.to_str().ok());
    match token {
        None => {
            s.tokenless_gets += 1;
            return reply(StatusCode::UNAUTHORIZED, "");
        }
        Some(t) if !s.tokens.iter().any(|k| k == t) => {
            return reply(StatusCode::UNAUTHORIZED, "");
        }
        Some(_) => {}
    }
    s.gets.push(path.clone());
    if path == LIFECYCLE && !s.lifecycle.is_empty() {
        let i = s.lifecycle_reads.min(s.lifecycle.len() - 1);
        s.lifecycle_reads += 1;
        let state = s.lifecycle[i].clone();
        return reply(StatusCode::OK, &state);
    }
    match s.paths.get(&path) {
        Some(v) => reply(StatusCode::OK, v),
        None => reply(StatusCode::NOT_FOUND, ""),
    }
}

/// A stub on a free loopback port with the usual metadata of one instance.
async fn start(lifecycle: &[&str]) -> (Imds, Shared) {
    let (addr, stub) = start_stub(lifecycle).await;
    (Imds::new(addr.to_string()), stub)
}

async fn start_stub(lifecycle: &[&str]) -> (std::net::SocketAddr, Shared) {
    let mut stub = Stub::default();
    for (k, v) in [
        ("/latest/meta-data/instance-id", "i-0abc123def4567890"),
        ("/latest/meta-data/placement/region", "eu-west-1"),
        (
            "/latest/meta-data/placement/availability-zone",
            "eu-west-1b",
        ),
        ("/latest/meta-data/local-ipv4", "10.0.1.23"),
        (
            "/latest/dynamic/instance-identity/document",
            r#"{"instanceId":"i-0abc123def4567890","region":"eu-west-1"}"#,
        ),
        (
            "/latest/dynamic/instance-identity/signature",
            "c2lnbmF0dXJl",
        ),
    ] {
        stub.paths.insert(k.to_owned(), v.to_owned());
    }
    stub.lifecycle = lifecycle.iter().map(|s| (*s).to_owned()).collect();
    let stub = Arc::new(Mutex::new(stub));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, stub.clone()));
    (addr, stub)
}

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("the IMDS scenario did not finish within 10s")
}

#[tokio::test]
async fn reads_identity_with_one_token_and_never_without() {
    within(async {
        let (imds, stub) = start(&[]).await;
        let id = imds.identity().await.expect("identity");
        assert_eq!(
            id,
            InstanceIdentity {
                instance_id: "i-0abc123def4567890".to_owned(),
                region: "eu-west-1".to_owned(),
                availability_zone: "eu-west-1b".to_owned(),
                private_ip: "10.0.1.23".parse().unwrap(),
            }
        );
        let doc = imds.signed_identity_document().await.expect("document");
        assert!(doc.document.contains("i-0abc123def4567890"));
        assert_eq!(doc.signature, "c2lnbmF0dXJl");
        let s = stub.lock().unwrap();
        assert_eq!(s.token_puts, 1, "the token is reused while it is valid");
        assert_eq!(s.ttls, ["21600"]);
        assert_eq!(s.tokenless_gets, 0, "IMDSv1 must never be used");
    })
    .await;
}

#[tokio::test]
async fn renews_the_token_when_the_service_refuses_it() {
    within(async {
        let (imds, stub) = start(&[]).await;
        imds.get("/latest/meta-data/instance-id").await.unwrap();
        // The service forgets every token (as after an expiry).
        stub.lock().unwrap().tokens.clear();
        let ip = imds.get("/latest/meta-data/local-ipv4").await.unwrap();
        assert_eq!(ip, "10.0.1.23");
        let s = stub.lock().unwrap();
        assert_eq!(s.token_puts, 2);
        assert_eq!(s.tokenless_gets, 0);
    })
    .await;
}

#[tokio::test]
async fn a_short_token_ttl_is_renewed_before_it_expires() {
    within(async {
        let (imds, stub) = start(&[]).await;
        // Shorter than the renewal margin: every read gets a fresh token.
        let imds = imds.with_token_ttl(Duration::from_secs(30));
        imds.get("/latest/meta-data/instance-id").await.unwrap();
        imds.get("/latest/meta-data/instance-id").await.unwrap();
        let s = stub.lock().unwrap();
        assert_eq!(s.ttls, ["30", "30"]);
    })
    .await;
}

#[tokio::test]
async fn missing_paths_and_errors_name_the_path() {
    within(async {
        let (imds, _stub) = start(&[]).await;
        assert_eq!(
            imds.get_optional("/latest/meta-data/nosuch").await.unwrap(),
            None
        );
        let e = imds.get("/latest/meta-data/nosuch").await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "instance metadata /latest/meta-data/nosuch answered 404 Not Found"
        );
        // Nothing listens on a port that was free a moment ago.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dead = Imds::new(format!("127.0.0.1:{port}"));
        let e = dead.identity().await.unwrap_err();
        assert!(matches!(e, ImdsError::Connect { .. }), "{e}");
    })
    .await;
}

#[tokio::test]
async fn an_instance_outside_any_group_may_join() {
    within(async {
        let (imds, _stub) = start(&[]).await;
        let state = imds.target_lifecycle_state().await.unwrap();
        assert_eq!(state, TargetLifecycleState::NotInGroup);
        assert!(state.may_join());
    })
    .await;
}

#[tokio::test]
async fn a_warmed_instance_waits_until_in_service() {
    within(async {
        let (imds, stub) = start(&[
            "Warmed:Running",
            "Warmed:Stopped",
            "Warmed:Hibernated",
            "InService",
        ])
        .await;
        assert_eq!(
            imds.target_lifecycle_state().await.unwrap(),
            TargetLifecycleState::Warmed(WarmedState::Running)
        );
        let state = wait_until_in_service(&imds, Duration::from_millis(10))
            .await
            .expect("put in service");
        assert_eq!(state, TargetLifecycleState::InService);
        let s = stub.lock().unwrap();
        assert_eq!(s.lifecycle_reads, 4, "polled until InService, then stopped");
        assert_eq!(s.tokenless_gets, 0);
    })
    .await;
}

#[tokio::test]
async fn a_warmed_instance_that_is_terminated_never_joins() {
    within(async {
        let (imds, _stub) = start(&["Warmed:Running", "Terminated"]).await;
        let r = wait_until_in_service(&imds, Duration::from_millis(10)).await;
        assert!(matches!(r, Err(NeverInService)), "{r:?}");
    })
    .await;
}

#[tokio::test]
async fn an_in_service_instance_joins_at_once() {
    within(async {
        let (imds, stub) = start(&["InService"]).await;
        let state = wait_until_in_service(&imds, Duration::from_secs(3600))
            .await
            .unwrap();
        assert_eq!(state, TargetLifecycleState::InService);
        assert_eq!(stub.lock().unwrap().lifecycle_reads, 1);
    })
    .await;
}

/// Stands in for the controller: accepts and counts TCP connections. The
/// agent's first step towards a Join is connecting, so no connection means
/// no Join.
async fn counting_controller() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    (addr, count)
}

/// A minion config with `[aws] imds = true` pointed at the stub, in `dir`
/// with a CA certificate and a join token.
fn warm_pool_config(
    dir: &Path,
    controller: std::net::SocketAddr,
    imds: std::net::SocketAddr,
) -> MinionConfig {
    let ca = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.cert.pem()).unwrap();
    std::fs::write(dir.join("token"), "t0ken\n").unwrap();
    let text = format!(
        r#"
        controller = "https://{controller}"
        ca_file = "ca.pem"
        fleet = "warm"
        join_token_file = "token"
        stop_grace = "1s"
        [engine]
        listen = "127.0.0.1:0"
        downstream = "127.0.0.1:9"
        [aws]
        imds = true
        imds_endpoint = "{imds}"
        warm_pool_poll = "10ms"
        "#
    );
    MinionConfig::parse(&dir.join("minion.toml"), &text).expect("valid config")
}

/// The notification socket a service manager would listen on.
fn notify_socket(dir: &Path) -> (UnixDatagram, Notifier) {
    let path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
    (sock, Notifier::to_socket(Some(path.as_os_str())))
}

async fn notification(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).await.expect("recv");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Waits, polling every 10 ms, until `f` holds (the caller's `within`
/// bounds the wait).
async fn until(mut f: impl FnMut() -> bool) {
    while !f() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_minion_in_a_warm_pool_is_ready_but_joins_only_once_in_service() {
    within(async {
        let (imds, stub) = start_stub(&["Warmed:Running"]).await;
        let (controller, connections) = counting_controller().await;
        let dir = tempfile::tempdir().unwrap();
        let config = warm_pool_config(dir.path(), controller, imds);
        let (sock, notifier) = notify_socket(dir.path());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        // No --instance-id: it comes from the instance metadata.
        let minion = tokio::spawn(async move {
            gru_minion::run_service(config, None, &notifier, async {
                let _ = stopped.await;
            })
            .await
        });

        assert_eq!(
            notification(&sock).await,
            "READY=1\n",
            "ready once the engine listens, before any warm-pool wait"
        );
        assert!(
            stub.lock()
                .unwrap()
                .gets
                .iter()
                .any(|p| p == "/latest/meta-data/instance-id"),
            "the instance id was read from the instance metadata"
        );
        // Several polls of Warmed:Running, and not one connection.
        until(|| {
            stub.lock().unwrap().lifecycle_reads >= 5 || connections.load(Ordering::SeqCst) > 0
        })
        .await;
        assert_eq!(
            connections.load(Ordering::SeqCst),
            0,
            "a warmed minion must not contact the controller"
        );

        // The group puts the instance in service: the agent goes to join.
        stub.lock().unwrap().lifecycle = vec!["InService".to_owned()];
        until(|| connections.load(Ordering::SeqCst) >= 1).await;
        let reads = stub.lock().unwrap().lifecycle_reads;
        let _ = stop.send(());
        assert_eq!(notification(&sock).await, "STOPPING=1\n");
        minion.await.unwrap().expect("a clean stop");
        let s = stub.lock().unwrap();
        assert_eq!(s.lifecycle_reads, reads, "no polling once in service");
        assert_eq!(s.tokenless_gets, 0);
    })
    .await;
}

#[tokio::test]
async fn a_warmed_minion_that_is_terminated_stops_without_joining() {
    within(async {
        let (imds, _stub) = start_stub(&["Warmed:Running", "Warmed:Running", "Terminated"]).await;
        let (controller, connections) = counting_controller().await;
        let dir = tempfile::tempdir().unwrap();
        let config = warm_pool_config(dir.path(), controller, imds);
        let (sock, notifier) = notify_socket(dir.path());
        gru_minion::run_service(config, None, &notifier, std::future::pending())
            .await
            .expect("a clean stop");
        assert_eq!(notification(&sock).await, "READY=1\n");
        assert_eq!(notification(&sock).await, "STOPPING=1\n");
        assert_eq!(connections.load(Ordering::SeqCst), 0);
    })
    .await;
}

#[tokio::test]
async fn without_an_instance_id_or_metadata_the_minion_refuses_to_start() {
    within(async {
        let (imds, _stub) = start_stub(&[]).await;
        let (controller, connections) = counting_controller().await;
        let dir = tempfile::tempdir().unwrap();
        let mut config = warm_pool_config(dir.path(), controller, imds);
        config.aws = None;
        let e =
            gru_minion::run_service(config, None, &Notifier::disabled(), std::future::pending())
                .await
                .expect_err("no instance id");
        assert!(matches!(e, gru_minion::AgentError::NoInstanceId), "{e}");
        assert_eq!(connections.load(Ordering::SeqCst), 0);
    })
    .await;
}
