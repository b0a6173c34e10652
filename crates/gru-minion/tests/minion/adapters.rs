//! The http and exec engine adapters against real peers: small HTTP servers
//! on loopback that behave like Mirth's REST API and a Prometheus metrics
//! page, and real shell scripts. What is asserted is what an operator
//! would check: the reported queue depth and health follow the engine, a
//! drain makes its calls in order and reports drained only once the queue
//! is empty and the after-drained calls were made, and failures are
//! reported, not panicked on.

use std::convert::Infallible;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use gru_minion::MinionConfig;
use gru_minion::config::EngineSection;
use gru_minion::engine::{Engine, ExecEngine, Health, HttpEngine};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

const PASSWORD: &str = "s3cret-Passw0rd";
/// Every wait for a condition gives up after this long.
const DEADLINE: Duration = Duration::from_secs(10);

/// What the fake engine answers and what it saw.
struct Fake {
    /// Queued messages per channel.
    channels: Vec<(String, u64)>,
    healthy: bool,
    /// `METHOD path` of every call that changes something, in order.
    calls: Vec<String>,
    /// Statistics reads (JSON or Prometheus).
    reads: usize,
    /// Requests without the right basic auth or X-Requested-With header.
    refused: usize,
    /// Open inbound connections the engine says it has.
    connections: u64,
}

type Shared = Arc<Mutex<Fake>>;

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", content_type.parse().unwrap());
    r
}

fn answer(fake: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let mut f = fake.lock().unwrap();
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("gru:{PASSWORD}"))
    );
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    if header("authorization") != Some(auth.as_str())
        || header("x-requested-with") != Some("OpenAPI")
    {
        f.refused += 1;
        return reply(StatusCode::UNAUTHORIZED, "text/plain", String::new());
    }
    let path = req.uri().path().to_owned();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/api/server/status") => {
            let status = if f.healthy {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            reply(status, "application/json", "0".to_owned())
        }
        (Method::GET, "/api/channels/statistics") => {
            f.reads += 1;
            // Shaped like Mirth 4's answer with Accept: application/json.
            let stats: Vec<String> = f
                .channels
                .iter()
                .map(|(id, q)| {
                    format!(
                        r#"{{"serverId":"s1","channelId":"{id}","received":10,"sent":8,"error":0,"filtered":0,"queued":{q}}}"#
                    )
                })
                .collect();
            let body = format!(
                r#"{{"list":{{"channelStatistics":[{}]}}}}"#,
                stats.join(",")
            );
            reply(StatusCode::OK, "application/json", body)
        }
        (Method::GET, "/metrics") => {
            f.reads += 1;
            let mut page = String::from(
                "# HELP iris_cpu_usage CPU usage\n# TYPE iris_cpu_usage gauge\niris_cpu_usage 17\n\
                 # HELP iris_interop_queued Messages queued\n# TYPE iris_interop_queued gauge\n",
            );
            for (id, q) in &f.channels {
                page.push_str(&format!(
                    "iris_interop_queued{{id=\"{id}\",production=\"HIE.Production\"}} {q}\n"
                ));
            }
            page.push_str("iris_interop_queued{id=\"Test.Out\",production=\"Other\"} 1000\n");
            page.push_str("iris_interop_queued_total 99\n");
            reply(StatusCode::OK, "text/plain; version=0.0.4", page)
        }
        (Method::GET, "/api/connections") => reply(
            StatusCode::OK,
            "application/json",
            format!(r#"{{"listener":{{"open":{}}}}}"#, f.connections),
        ),
        (Method::POST, "/api/listener/_shed") => {
            let query = req.uri().query().unwrap_or_default().to_owned();
            f.calls.push(format!("POST /api/listener/_shed?{query}"));
            reply(StatusCode::NO_CONTENT, "text/plain", String::new())
        }
        (Method::POST, p)
            if p.starts_with("/api/channels/")
                && ["/_pause", "/_stop", "/_start"]
                    .iter()
                    .any(|s| p.ends_with(s)) =>
        {
            f.calls.push(format!("POST {p}"));
            reply(StatusCode::NO_CONTENT, "text/plain", String::new())
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", String::new()),
    }
}

/// Serves until aborted; aborting drops every connection too (a server that
/// went down, not one that only stopped accepting).
async fn serve(listener: TcpListener, fake: Shared) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let fake = fake.clone();
        connections.spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let fake = fake.clone();
                async move { Ok::<_, Infallible>(answer(&fake, req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn start_fake(channels: &[(&str, u64)]) -> (String, Shared, tokio::task::JoinHandle<()>) {
    let fake = Arc::new(Mutex::new(Fake {
        channels: channels.iter().map(|(c, q)| (c.to_string(), *q)).collect(),
        healthy: true,
        calls: Vec::new(),
        reads: 0,
        refused: 0,
        connections: 0,
    }));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(serve(listener, fake.clone()));
    (base, fake, server)
}

fn set_queued(fake: &Shared, queued: &[u64]) {
    let mut f = fake.lock().unwrap();
    for (c, q) in f.channels.iter_mut().zip(queued) {
        c.1 = *q;
    }
}

/// Waits until `cond` holds, or fails the test after [`DEADLINE`].
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The minion config around an `[engine]` text, parsed as `gru minion`
/// would, in `dir`.
fn config(dir: &Path, engine: &str) -> MinionConfig {
    let text = format!(
        "controller = \"https://127.0.0.1:7070\"\nca_file = \"ca.pem\"\nfleet = \"f\"\n\
         join_token_file = \"token\"\n{engine}"
    );
    MinionConfig::parse(&dir.join("minion.toml"), &text).expect("valid config")
}

fn mirth_config(dir: &Path, base: &str) -> MinionConfig {
    mirth_config_with(dir, base, "")
}

/// With more `[engine.http]` keys.
fn mirth_config_with(dir: &Path, base: &str, more: &str) -> MinionConfig {
    std::fs::write(dir.join("mirth-password"), format!("{PASSWORD}\n")).unwrap();
    config(
        dir,
        &format!(
            r#"
[engine]
kind = "http"
advertise = "127.0.0.1:6661"
poll_interval = "50ms"
timeout = "2s"
[engine.http]
username = "gru"
password_file = "mirth-password"
headers = {{ "X-Requested-With" = "OpenAPI" }}
queue_depth = {{ url = "{base}/api/channels/statistics", json_pointer = "/list/channelStatistics/*/queued" }}
health = {{ url = "{base}/api/server/status", expect_status = 200 }}
drain = [
  {{ method = "POST", url = "{base}/api/channels/a/_pause" }},
  {{ method = "POST", url = "{base}/api/channels/b/_pause" }},
]
after_drained = [
  {{ url = "{base}/api/channels/a/_stop" }},
  {{ url = "{base}/api/channels/b/_stop" }},
]
resume = [
  {{ url = "{base}/api/channels/a/_start" }},
  {{ url = "{base}/api/channels/b/_start" }},
]
{more}
"#
        ),
    )
}

fn http_engine(config: &MinionConfig) -> HttpEngine {
    let EngineSection::Http(section) = &config.engine else {
        panic!("kind = http")
    };
    HttpEngine::start(section).expect("starts")
}

#[tokio::test]
async fn http_adapter_drives_a_mirth_like_engine() {
    let dir = tempfile::tempdir().unwrap();
    let (base, fake, _server) = start_fake(&[("a", 2), ("b", 3)]).await;
    let config = mirth_config(dir.path(), &base);
    let debug = format!("{config:?}");
    assert!(!debug.contains(PASSWORD), "the password leaked: {debug}");
    let engine = http_engine(&config);
    let debug = format!("{engine:?}");
    assert!(!debug.contains(PASSWORD), "the password leaked: {debug}");
    assert_eq!(engine.address().to_string(), "127.0.0.1:6661");

    wait_until("the queue depth reads 5 and health is good", || {
        let s = engine.status();
        s.queue_depth == 5 && s.health == Health::Healthy
    })
    .await;
    set_queued(&fake, &[1, 0]);
    wait_until("the queue depth follows the server", || {
        engine.status().queue_depth == 1
    })
    .await;

    fake.lock().unwrap().healthy = false;
    wait_until("health follows the health URL", || {
        engine.status().health == Health::Unhealthy
    })
    .await;
    let e = engine.last_error().expect("the failure is kept");
    assert!(e.contains("engine.http.health") && e.contains("503"), "{e}");
    fake.lock().unwrap().healthy = true;
    wait_until("health recovers", || {
        engine.status().health == Health::Healthy
    })
    .await;

    // Drain: the pause calls in order, then nothing until the queue is empty.
    set_queued(&fake, &[4, 1]);
    engine.drain();
    assert!(engine.status().draining, "draining at once");
    wait_until("both channels are paused", || {
        fake.lock().unwrap().calls.len() >= 2
    })
    .await;
    let reads = fake.lock().unwrap().reads;
    wait_until("several more polls", || {
        fake.lock().unwrap().reads >= reads + 4
    })
    .await;
    let s = engine.status();
    assert!(
        s.draining && !s.drained,
        "drained while messages are queued: {s:?}"
    );
    assert_eq!(
        fake.lock().unwrap().calls,
        ["POST /api/channels/a/_pause", "POST /api/channels/b/_pause"],
        "no stop while messages are queued"
    );
    set_queued(&fake, &[0, 0]);
    wait_until("drained", || engine.status().drained).await;
    assert_eq!(
        fake.lock().unwrap().calls,
        [
            "POST /api/channels/a/_pause",
            "POST /api/channels/b/_pause",
            "POST /api/channels/a/_stop",
            "POST /api/channels/b/_stop",
        ],
        "drained only after the after-drained calls"
    );
    engine.drain();
    assert!(engine.status().drained, "a second drain changes nothing");

    engine.resume();
    let s = engine.status();
    assert!(!s.draining && !s.drained, "resume clears the flags: {s:?}");
    wait_until("both channels are started", || {
        fake.lock().unwrap().calls.len() == 6
    })
    .await;
    assert_eq!(
        fake.lock().unwrap().calls[4..],
        ["POST /api/channels/a/_start", "POST /api/channels/b/_start"]
    );
    assert_eq!(
        fake.lock().unwrap().refused,
        0,
        "every request carried the basic auth and X-Requested-With headers"
    );
    engine.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn http_adapter_reports_connections_and_sheds_them_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let (base, fake, _server) = start_fake(&[("a", 0)]).await;
    fake.lock().unwrap().connections = 12;
    let plain = mirth_config(dir.path(), &base);
    let engine = http_engine(&plain);
    assert!(!engine.can_shed(), "no shed call configured");
    assert_eq!(engine.shed(3), 0, "nothing to ask with");
    drop(engine);

    let engine = http_engine(&mirth_config_with(
        dir.path(),
        &base,
        &format!(
            r#"connections = {{ url = "{base}/api/connections", json_pointer = "/listener/open" }}
shed = {{ url = "{base}/api/listener/_shed?count={{count}}" }}"#
        ),
    ));
    assert!(engine.can_shed());
    wait_until("the connections read", || {
        engine.status().open_connections == 12
    })
    .await;
    assert_eq!(engine.shed(4), 4);
    wait_until("the shed call is made", || {
        !fake.lock().unwrap().calls.is_empty()
    })
    .await;
    assert_eq!(
        fake.lock().unwrap().calls,
        ["POST /api/listener/_shed?count=4"],
        "the count in place of {{count}}"
    );
    fake.lock().unwrap().connections = 8;
    wait_until("the connections follow", || {
        engine.status().open_connections == 8
    })
    .await;

    // While draining, a request to shed is not passed on: the drain closes
    // every connection anyway.
    engine.drain();
    assert_eq!(engine.shed(2), 0);
    wait_until("drained", || engine.status().drained).await;
    assert!(
        !fake
            .lock()
            .unwrap()
            .calls
            .iter()
            .any(|c| c.contains("count=2")),
        "{:?}",
        fake.lock().unwrap().calls
    );
    assert_eq!(fake.lock().unwrap().refused, 0);
    engine.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn http_adapter_reads_prometheus_and_survives_a_server_going_down() {
    let dir = tempfile::tempdir().unwrap();
    let (base, fake, server) = start_fake(&[("HL7.In", 3), ("HL7.Out", 4)]).await;
    std::fs::write(dir.path().join("mirth-password"), PASSWORD).unwrap();
    let text = format!(
        r#"
[engine]
kind = "http"
advertise = "127.0.0.1:6661"
poll_interval = "50ms"
timeout = "1s"
[engine.http]
username = "gru"
password_file = "mirth-password"
headers = {{ "X-Requested-With" = "OpenAPI" }}
queue_depth = {{ url = "{base}/metrics", prometheus_metric = "iris_interop_queued", labels = {{ production = "HIE.Production" }} }}
drain = [{{ url = "{base}/api/channels/all/_pause" }}]
resume = [{{ url = "{base}/api/channels/all/_start" }}]
"#
    );
    let engine = http_engine(&config(dir.path(), &text));
    wait_until("the sum of the matching samples", || {
        let s = engine.status();
        s.queue_depth == 7 && s.health == Health::Healthy
    })
    .await;
    set_queued(&fake, &[0, 2]);
    wait_until("the depth follows", || engine.status().queue_depth == 2).await;

    server.abort();
    wait_until("a server that is down is unhealthy", || {
        engine.status().health == Health::Unhealthy
    })
    .await;
    let s = engine.status();
    assert_eq!(s.queue_depth, 2, "the last depth is kept");
    let e = engine.last_error().expect("the failure is kept");
    assert!(e.contains("engine.http.queue_depth: GET"), "{e}");

    // A drain against a server that is down is retried, never drained.
    engine.drain();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!engine.status().drained);
    let started = tokio::time::Instant::now();
    engine.shutdown(Duration::from_millis(200)).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "shutdown waits only its grace"
    );
}

// ---- exec ----

/// Scripts in a temp dir that read and write files beside them.
struct Scripts {
    dir: tempfile::TempDir,
}

impl Scripts {
    fn new() -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        let scripts = [
            ("depth.sh", format!("#!/bin/sh\nexec cat '{d}/depth'\n")),
            (
                "connections.sh",
                format!("#!/bin/sh\nexec cat '{d}/connections'\n"),
            ),
            (
                "shed.sh",
                format!("#!/bin/sh\necho \"shed $1 $2\" >> '{d}/calls'\n"),
            ),
            ("health.sh", format!("#!/bin/sh\ntest -e '{d}/healthy'\n")),
            (
                "drain.sh",
                format!("#!/bin/sh\necho \"drain $1\" >> '{d}/calls'\n"),
            ),
            (
                "resume.sh",
                format!("#!/bin/sh\necho resume >> '{d}/calls'\n"),
            ),
            (
                "hang.sh",
                format!("#!/bin/sh\necho $$ > '{d}/hang.pid'\nexec sleep 60\n"),
            ),
        ];
        for (name, text) in scripts {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let s = Scripts { dir };
        s.write("depth", "5\n");
        s.write("healthy", "");
        s
    }

    /// Replaces the file at once (write and rename), so a script never
    /// reads it half written.
    fn write(&self, name: &str, text: &str) {
        let tmp = self.dir.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.dir.path().join(name)).unwrap();
    }

    fn calls(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("calls")).unwrap_or_default()
    }

    fn engine(&self, queue_depth: &str, timeout: &str) -> ExecEngine {
        self.engine_with(queue_depth, timeout, "")
    }

    /// With more `[engine.exec]` keys.
    fn engine_with(&self, queue_depth: &str, timeout: &str, more: &str) -> ExecEngine {
        let config = config(
            self.dir.path(),
            &format!(
                r#"
[engine]
kind = "exec"
advertise = "127.0.0.1:6661"
poll_interval = "50ms"
timeout = "{timeout}"
[engine.exec]
queue_depth = {queue_depth}
health = ["./health.sh"]
drain = ["./drain.sh", "now"]
resume = ["./resume.sh"]
{more}
"#
            ),
        );
        let EngineSection::Exec(section) = &config.engine else {
            panic!("kind = exec")
        };
        ExecEngine::start(section)
    }
}

#[tokio::test]
async fn exec_adapter_drives_an_engine_through_commands() {
    let s = Scripts::new();
    let engine = s.engine(r#"["./depth.sh"]"#, "5s");
    wait_until("depth 5 and healthy", || {
        let st = engine.status();
        st.queue_depth == 5 && st.health == Health::Healthy
    })
    .await;
    std::fs::remove_file(s.dir.path().join("healthy")).unwrap();
    wait_until("unhealthy when health exits non-zero", || {
        engine.status().health == Health::Unhealthy
    })
    .await;
    assert!(
        engine
            .last_error()
            .is_some_and(|e| e.contains("engine.exec.health") && e.contains("exit status: 1")),
        "{:?}",
        engine.last_error()
    );
    s.write("healthy", "");
    wait_until("healthy again", || {
        engine.status().health == Health::Healthy
    })
    .await;

    s.write("depth", "3\n");
    engine.drain();
    wait_until("the drain command ran", || s.calls() == "drain now\n").await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    let st = engine.status();
    assert!(st.draining && !st.drained && st.queue_depth == 3, "{st:?}");
    s.write("depth", "0");
    wait_until("drained at depth 0", || engine.status().drained).await;
    assert_eq!(s.calls(), "drain now\n", "the drain command ran once");

    engine.resume();
    wait_until("the resume command ran", || {
        s.calls() == "drain now\nresume\n"
    })
    .await;
    assert!(!engine.status().draining);

    // Stopping with an empty queue does not wait out the grace.
    let started = tokio::time::Instant::now();
    engine.shutdown(Duration::from_secs(30)).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(s.calls(), "drain now\nresume\ndrain now\n");
}

#[tokio::test]
async fn exec_adapter_reports_garbage_missing_and_hanging_commands() {
    let s = Scripts::new();
    let engine = s.engine(r#"["./depth.sh"]"#, "5s");
    wait_until("healthy", || engine.status().health == Health::Healthy).await;
    s.write("depth", "lots of messages\n");
    wait_until("garbage makes it unhealthy", || {
        engine.status().health == Health::Unhealthy
    })
    .await;
    let e = engine.last_error().expect("kept");
    assert!(
        e.contains("engine.exec.queue_depth:")
            && e.contains("printed \"lots of messages\\n\", expected a non-negative integer"),
        "{e}"
    );
    assert_eq!(
        engine.status().queue_depth,
        5,
        "the last good depth is kept"
    );
    drop(engine);

    let engine = s.engine(r#"["./no-such-command"]"#, "5s");
    wait_until("the failure is reported", || engine.last_error().is_some()).await;
    let e = engine.last_error().expect("kept");
    assert!(
        e.contains("engine.exec.queue_depth: cannot run") && e.contains("no-such-command"),
        "{e}"
    );
    assert_eq!(
        engine.status().health,
        Health::Starting,
        "never answered: it may still be starting"
    );
    drop(engine);

    let engine = s.engine(r#"["./hang.sh"]"#, "200ms");
    wait_until("the hang is reported", || engine.last_error().is_some()).await;
    let e = engine.last_error().expect("kept");
    assert!(e.contains("took more than 200ms and was killed"), "{e}");
    drop(engine);
    let pid = std::fs::read_to_string(s.dir.path().join("hang.pid")).unwrap();
    let stat = format!("/proc/{}/stat", pid.trim());
    wait_until("the hanging command is gone", || {
        // Gone, or a zombie until the runtime reaps it.
        std::fs::read_to_string(&stat).map_or(true, |st| st.contains(") Z "))
    })
    .await;
}

#[tokio::test]
async fn exec_adapter_reports_connections_and_sheds_them_on_request() {
    let s = Scripts::new();
    s.write("connections", "9\n");
    let engine = s.engine(r#"["./depth.sh"]"#, "5s");
    assert!(!engine.can_shed(), "no shed command configured");
    drop(engine);

    let engine = s.engine_with(
        r#"["./depth.sh"]"#,
        "5s",
        r#"connections = ["./connections.sh"]
shed = ["./shed.sh", "--close", "{count}"]"#,
    );
    assert!(engine.can_shed());
    wait_until("the connections read", || {
        engine.status().open_connections == 9
    })
    .await;
    assert_eq!(engine.shed(3), 3);
    wait_until("the shed command ran", || s.calls() == "shed --close 3\n").await;

    // A bad count is reported but does not make the engine unhealthy: only
    // rebalancing reads it.
    s.write("connections", "many\n");
    wait_until("the failure is reported", || {
        engine
            .last_error()
            .is_some_and(|e| e.contains("engine.exec.connections:"))
    })
    .await;
    let st = engine.status();
    assert_eq!(st.health, Health::Healthy);
    assert_eq!(st.open_connections, 9, "the last good count is kept");
    engine.shutdown(Duration::from_secs(5)).await;
}
