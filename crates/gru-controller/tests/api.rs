//! The controller's gRPC API over real loopback sockets with TLS: what it
//! refuses (and that it keeps serving after), and one minion's whole life
//! from join to terminate with an in-process agent and engine.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use gru_cloud::local::LocalLoadBalancer;
use gru_cloud::{
    CapacityGroup, CloudError, GroupState, Instance, InstanceId, InstanceLifecycle, TargetState,
};
use gru_controller::pki::DevPki;
use gru_controller::store::SqliteStore;
use gru_controller::{Controller, ControllerConfig, FleetRuntime};
use gru_proto::v1 as pb;
use pb::admin_service_client::AdminServiceClient;
use pb::minion_service_client::MinionServiceClient;
use tokio::net::TcpListener;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

#[path = "api/access.rs"]
mod access;
#[path = "api/front_door.rs"]
mod front_door;
#[path = "api/identity.rs"]
mod identity;
#[path = "api/metrics.rs"]
mod metrics;
#[path = "api/minion_certs.rs"]
mod minion_certs;
#[path = "api/restart.rs"]
mod restart;
#[path = "api/rotation.rs"]
mod rotation;
#[path = "api/scenarios.rs"]
mod scenarios;

const TOKEN: &str = "test-join-token";
const TEST_DEADLINE: Duration = Duration::from_secs(30);

/// A capacity group with a fixed set of instances that records terminations.
/// The group is not what these tests exercise; the controller's API is.
struct StaticGroup {
    state: Mutex<GroupState>,
    terminated: Mutex<Vec<(InstanceId, bool)>>,
}

impl StaticGroup {
    fn new(ids: &[&str]) -> Arc<Self> {
        let instances = ids
            .iter()
            .map(|id| Instance {
                id: InstanceId::from(*id),
                lifecycle: InstanceLifecycle::InService,
                launched_at: SystemTime::now(),
            })
            .collect();
        Arc::new(StaticGroup {
            state: Mutex::new(GroupState {
                desired: ids.len() as u32,
                min: 0,
                max: 10,
                instances,
            }),
            terminated: Mutex::new(Vec::new()),
        })
    }
}

#[async_trait]
impl CapacityGroup for StaticGroup {
    async fn describe(&self) -> Result<GroupState, CloudError> {
        Ok(self.state.lock().expect("lock").clone())
    }
    async fn set_desired(&self, desired: u32) -> Result<(), CloudError> {
        self.state.lock().expect("lock").desired = desired;
        Ok(())
    }
    async fn terminate(&self, id: &InstanceId, decrement: bool) -> Result<(), CloudError> {
        let mut s = self.state.lock().expect("lock");
        let before = s.instances.len();
        s.instances.retain(|i| &i.id != id);
        if s.instances.len() < before {
            if decrement {
                s.desired -= 1;
            }
            self.terminated
                .lock()
                .expect("lock")
                .push((id.clone(), decrement));
        }
        Ok(())
    }
}

struct Fixture {
    addr: std::net::SocketAddr,
    dir: tempfile::TempDir,
    pki: DevPki,
    group: Arc<StaticGroup>,
    lb: Arc<LocalLoadBalancer>,
    /// Where the controller serves its Prometheus metrics.
    metrics: std::net::SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// The controller config these tests run: one local fleet, fast intervals,
/// its files in `dir`.
fn config(dir: &std::path::Path) -> ControllerConfig {
    config_sized(dir, 0, 3)
}

/// [`config`] with the fleet's bounds.
fn config_sized(dir: &std::path::Path, min: u32, max: u32) -> ControllerConfig {
    config_with(dir, min, max, "")
}

/// [`config_sized`] with `extra` tables at the end.
fn config_with(dir: &std::path::Path, min: u32, max: u32, extra: &str) -> ControllerConfig {
    let text = r#"
        listen = "127.0.0.1:0"
        report_interval = "200ms"
        lost_timeout = "5s"
        eval_interval = "200ms"
        join_token_file = "token"
        state_dir = "state"
        [tls]
        cert = "controller.pem"
        key = "controller.key"
        client_ca = "ca.pem"
        [[fleet]]
        name = "local"
        provider = "local"
        min = MIN
        max = MAX
        [fleet.local]
        listen = "127.0.0.1:0"
        minion_config = "unused.toml"
    "#
    .replace("MIN", &min.to_string())
    .replace("MAX", &max.to_string())
        + extra;
    ControllerConfig::parse(&dir.join("controller.toml"), &text).expect("config")
}

async fn start(instances: &[&str]) -> Fixture {
    start_sized(instances, 0, 3).await
}

/// [`start`] with the fleet's bounds.
async fn start_sized(instances: &[&str], min: u32, max: u32) -> Fixture {
    start_with(instances, min, max, "").await
}

/// [`start_sized`] with `extra` tables in the controller's config.
async fn start_with(instances: &[&str], min: u32, max: u32, extra: &str) -> Fixture {
    gru_proto::install_crypto_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = DevPki::in_dir(dir.path());
    pki.ensure().expect("pki");
    std::fs::write(dir.path().join("token"), TOKEN).expect("token");
    let config = config_with(dir.path(), min, max, extra);
    let lb = LocalLoadBalancer::start(
        TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        Duration::from_secs(300),
    );
    let group = StaticGroup::new(instances);
    let fleet = FleetRuntime::new(config.fleets[0].clone(), group.clone(), lb.clone());
    let store = SqliteStore::open(&config.state_dir).expect("store");
    let controller = Controller::new(config, vec![fleet], TOKEN.to_owned(), Arc::new(store))
        .expect("controller");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let metrics_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let metrics = metrics_listener.local_addr().expect("addr");
    tokio::spawn(gru_proto::metrics::serve(
        metrics_listener,
        controller.metrics_site(),
        std::future::pending(),
    ));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(gru_controller::run(controller, listener, async {
        let _ = stopped.await;
    }));
    Fixture {
        addr,
        dir,
        pki,
        group,
        lb,
        metrics,
        _stop: stop,
    }
}

impl Fixture {
    async fn channel(&self, admin: bool) -> Channel {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(
                std::fs::read(&self.pki.ca_cert).expect("ca"),
            ))
            .domain_name("localhost");
        if admin {
            tls = tls.identity(Identity::from_pem(
                std::fs::read(&self.pki.admin_cert).expect("cert"),
                std::fs::read(&self.pki.admin_key).expect("key"),
            ));
        }
        Channel::from_shared(format!("https://{}", self.addr))
            .expect("uri")
            .tls_config(tls)
            .expect("tls")
            .connect()
            .await
            .expect("connect")
    }

    async fn minion_client(&self) -> MinionServiceClient<Channel> {
        MinionServiceClient::new(self.channel(false).await)
    }

    /// A minion's client whose connection presents `certificate_pem` (for
    /// [`test_key`]), as an agent's Session does.
    async fn minion_client_with(&self, certificate_pem: &str) -> MinionServiceClient<Channel> {
        let ca = std::fs::read(&self.pki.ca_cert).expect("ca");
        let channel = tls_channel(self.addr, &ca, certificate_pem, &test_key().0)
            .await
            .expect("connect");
        MinionServiceClient::new(channel)
    }

    /// The client for the Session of the minion that `joined` answered.
    async fn session_client(&self, joined: &pb::JoinResponse) -> MinionServiceClient<Channel> {
        let c = joined
            .certificate
            .as_ref()
            .expect("Join issues a certificate");
        self.minion_client_with(&c.certificate_pem).await
    }

    async fn admin(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(self.channel(true).await)
    }
}

/// Joins `instance` of fleet "local" and opens its Session, which reports
/// every 100 ms, healthy and idle, for as long as it is open. Returns the
/// Session's commands.
async fn reporting_minion(fx: &Fixture, instance: &str) -> tonic::Streaming<pb::ControllerCommand> {
    let joined = fx
        .minion_client()
        .await
        .join(join_request("local", instance, TOKEN))
        .await
        .expect("join")
        .into_inner();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(hello(&joined.minion_id, &joined.session_token))
        .await
        .expect("hello");
    let commands = fx
        .session_client(&joined)
        .await
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("session")
        .into_inner();
    tokio::spawn(async move {
        for seq in 1.. {
            let report = pb::SessionMessage {
                body: Some(pb::session_message::Body::Report(pb::MinionReport {
                    seq,
                    health: pb::EngineHealth::Healthy as i32,
                    ..Default::default()
                })),
            };
            if tx.send(report).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    commands
}

/// Every event in the controller's log, oldest first, as `client` may read
/// them (WatchEvents from the start, not following).
async fn logged_events(client: &mut AdminServiceClient<Channel>) -> Vec<pb::Event> {
    let mut stream = client
        .watch_events(pb::WatchEventsRequest {
            since_unix_ms: Some(0),
            ..Default::default()
        })
        .await
        .expect("events")
        .into_inner();
    let mut events = Vec::new();
    while let Some(e) = stream.message().await.expect("event") {
        events.push(e);
    }
    events
}

/// A connection to the controller at `addr` that trusts the CA in `ca`
/// (PEM) and presents `cert` with `key`.
async fn tls_channel(
    addr: std::net::SocketAddr,
    ca: &[u8],
    cert: &str,
    key: &str,
) -> Result<Channel, tonic::transport::Error> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost")
        .identity(Identity::from_pem(cert, key));
    Channel::from_shared(format!("https://{addr}"))
        .expect("uri")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
}

fn join_request(fleet: &str, instance: &str, token: &str) -> pb::JoinRequest {
    pb::JoinRequest {
        fleet: fleet.to_owned(),
        instance_id: instance.to_owned(),
        engine_address: "127.0.0.1:9".to_owned(),
        identity: Some(pb::join_request::Identity::JoinToken(token.to_owned())),
        agent_version: "test".to_owned(),
        metrics_address: String::new(),
        csr_pem: test_key().1.clone(),
    }
}

/// The key pair (PEM) every test minion uses, and a certificate request
/// for it.
fn test_key() -> &'static (String, String) {
    static KEY: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        let key = rcgen::KeyPair::generate().expect("key");
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .expect("csr")
            .pem()
            .expect("pem");
        (key.serialize_pem(), csr)
    })
}

async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < TEST_DEADLINE,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn bad_joins_are_refused_and_the_server_keeps_serving() {
    let fx = start(&["i-1"]).await;
    let mut c = fx.minion_client().await;

    let e = c
        .join(join_request("nope", "i-1", TOKEN))
        .await
        .expect_err("unknown fleet");
    assert_eq!(e.code(), Code::NotFound);
    assert!(
        e.message().contains("unknown fleet \"nope\""),
        "{}",
        e.message()
    );

    let e = c
        .join(join_request("local", "i-1", "wrong"))
        .await
        .expect_err("bad token");
    assert_eq!(e.code(), Code::Unauthenticated);

    let e = c
        .join(join_request("local", "i-404", TOKEN))
        .await
        .expect_err("not in group");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("i-404 is not in fleet"),
        "{}",
        e.message()
    );

    let mut bad_addr = join_request("local", "i-1", TOKEN);
    bad_addr.engine_address = "not an address".to_owned();
    let e = c.join(bad_addr).await.expect_err("bad address");
    assert_eq!(e.code(), Code::InvalidArgument);

    // Still serving: health says so and a good join works.
    let mut health = tonic_health::pb::health_client::HealthClient::new(fx.channel(false).await);
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "gru.v1.MinionService".to_owned(),
        })
        .await
        .expect("health");
    assert_eq!(
        h.into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let joined = c
        .join(join_request("local", "i-1", TOKEN))
        .await
        .expect("join")
        .into_inner();
    assert!(joined.minion_id.starts_with("m-"));
    let again = c
        .join(join_request("local", "i-1", TOKEN))
        .await
        .expect("rejoin")
        .into_inner();
    assert_eq!(
        again.minion_id, joined.minion_id,
        "joining again returns the same minion"
    );
}

fn hello(id: &str, token: &str) -> pb::SessionMessage {
    pb::SessionMessage {
        body: Some(pb::session_message::Body::Hello(pb::SessionHello {
            minion_id: id.to_owned(),
            session_token: token.to_owned(),
        })),
    }
}

#[tokio::test]
async fn session_messages_out_of_order_are_refused() {
    let fx = start(&["i-1"]).await;
    let joined = fx
        .minion_client()
        .await
        .join(join_request("local", "i-1", TOKEN))
        .await
        .expect("join")
        .into_inner();
    let mut c = fx.session_client(&joined).await;

    let report = pb::SessionMessage {
        body: Some(pb::session_message::Body::Report(
            pb::MinionReport::default(),
        )),
    };
    let e = c
        .session(futures::stream::iter(vec![report]))
        .await
        .expect_err("report first");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("out of order"), "{}", e.message());

    let e = c
        .session(futures::stream::iter(vec![hello(
            &joined.minion_id,
            "forged",
        )]))
        .await
        .expect_err("bad session token");
    assert_eq!(e.code(), Code::Unauthenticated);

    let twice = vec![
        hello(&joined.minion_id, &joined.session_token),
        hello(&joined.minion_id, &joined.session_token),
    ];
    let mut stream = c
        .session(futures::stream::iter(twice))
        .await
        .expect("session")
        .into_inner();
    let e = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("stream ended without refusing the second hello"),
            Err(e) => break e,
        }
    };
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("SessionHello sent twice"),
        "{}",
        e.message()
    );
}

#[tokio::test]
async fn admin_calls_need_a_client_certificate() {
    let fx = start(&[]).await;
    let mut anonymous = AdminServiceClient::new(fx.channel(false).await);
    let e = anonymous
        .list_fleets(pb::ListFleetsRequest {})
        .await
        .expect_err("no client certificate");
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(
        e.message().contains("client certificate"),
        "{}",
        e.message()
    );
    let fleets = fx
        .admin()
        .await
        .list_fleets(pb::ListFleetsRequest {})
        .await
        .expect("admin")
        .into_inner();
    assert_eq!(fleets.fleets.len(), 1);
    assert_eq!(fleets.fleets[0].name, "local");
}

/// A minion config for `fx`'s controller, with `extra` top-level keys and
/// the reference engine, whose downstream is a real MLLP sink started here.
async fn minion_config(fx: &Fixture, extra: &str) -> gru_minion::MinionConfig {
    let sink_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let sink_addr = sink_listener.local_addr().expect("addr");
    tokio::spawn(gru_engine::bench::run_sink(
        sink_listener,
        Default::default(),
        gru_engine::bench::SinkHandle::new(),
        std::future::pending(),
    ));
    let minion_toml = format!(
        "controller = \"https://{}\"\nca_file = \"ca.pem\"\nfleet = \"local\"\njoin_token_file = \"token\"\n\
         {extra}[engine]\nlisten = \"127.0.0.1:0\"\ndownstream = \"{sink_addr}\"\n",
        fx.addr
    );
    gru_minion::MinionConfig::parse(&fx.dir.path().join("minion.toml"), &minion_toml)
        .expect("minion config")
}

#[tokio::test]
async fn a_minion_joins_serves_and_is_drained_before_it_is_terminated() {
    let fx = start(&["i-1"]).await;
    let config = minion_config(&fx, "").await;
    let (stop_agent, agent_stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(gru_minion::run(config, "i-1".to_owned(), async {
        let _ = agent_stopped.await;
    }));

    let mut admin = fx.admin().await;
    let list = |mut admin: AdminServiceClient<Channel>| async move {
        admin
            .list_minions(pb::ListMinionsRequest {
                fleet: String::new(),
                include_gone: true,
            })
            .await
            .expect("ls")
            .into_inner()
            .minions
    };
    let minion = eventually("the minion to be in service", || {
        let admin = admin.clone();
        async move {
            list(admin)
                .await
                .into_iter()
                .find(|m| m.state == "InService")
        }
    })
    .await;
    let target = fx
        .lb
        .targets()
        .into_iter()
        .next()
        .expect("registered in the load balancer");
    assert_eq!(target.state, TargetState::Healthy);
    assert_eq!(target.target.address.to_string(), minion.engine_address);

    // Scale in by hand: Drain with the desired capacity decremented.
    admin
        .drain(pb::DrainRequest {
            id: minion.id.clone(),
            replace: false,
        })
        .await
        .expect("drain");
    let gone = eventually("the minion to be gone", || {
        let admin = admin.clone();
        let id = minion.id.clone();
        async move {
            list(admin)
                .await
                .into_iter()
                .find(|m| m.id == id && m.state == "Gone")
        }
    })
    .await;
    let path: Vec<&str> = gone.history.iter().map(|t| t.to.as_str()).collect();
    assert_eq!(
        path,
        [
            "Joining",
            "Ready",
            "InService",
            "Draining/Deregistering",
            "Draining/Flushing",
            "Draining/AwaitingUnused",
            "Drained",
            "Terminating",
            "Gone"
        ]
    );
    assert!(fx.lb.targets().is_empty(), "out of the load balancer");
    // Terminated once, with the desired capacity decremented in that call.
    assert_eq!(
        *fx.group.terminated.lock().expect("lock"),
        vec![(InstanceId::from("i-1"), true)]
    );

    let _ = stop_agent.send(());
    tokio::time::timeout(TEST_DEADLINE, agent)
        .await
        .expect("agent stops")
        .expect("join")
        .expect("agent ok");
}

/// Lists services over gRPC reflection, in both protocol versions (Python's
/// grpcio-reflection speaks only v1alpha).
#[tokio::test]
async fn reflection_lists_gru_services_in_v1_and_v1alpha() {
    use tonic_reflection::pb::{v1, v1alpha};
    let fx = start(&[]).await;

    let mut c1 = v1::server_reflection_client::ServerReflectionClient::new(fx.channel(false).await);
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut stream = c1
        .server_reflection_info(futures::stream::iter(vec![req]))
        .await
        .expect("v1")
        .into_inner();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) = stream
        .message()
        .await
        .expect("v1 answer")
        .and_then(|r| r.message_response)
    else {
        panic!("v1 reflection did not list services")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "gru.v1.MinionService",
        "gru.v1.AdminService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }

    let mut ca =
        v1alpha::server_reflection_client::ServerReflectionClient::new(fx.channel(false).await);
    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut stream = ca
        .server_reflection_info(futures::stream::iter(vec![req]))
        .await
        .expect("v1alpha")
        .into_inner();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        stream
            .message()
            .await
            .expect("v1alpha answer")
            .and_then(|r| r.message_response)
    else {
        panic!("v1alpha reflection did not list services")
    };
    assert!(list.service.iter().any(|s| s.name == "gru.v1.AdminService"));
}
