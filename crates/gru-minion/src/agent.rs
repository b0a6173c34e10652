//! Join, keep one Session open, report, obey commands; reconnect with
//! jittered backoff when anything breaks.
//!
//! With several controllers (one leads, the others are standbys) the agent
//! tries them in turn and follows a standby's answer to the leader, if the
//! leader is one of them ([`Round`], [`resolve`], [`leader_target`]); the
//! CLI reuses these.
//!
//! The agent makes a key pair when it starts; the key never leaves the
//! process. Join sends a certificate request for it and gets back the
//! minion's certificate (`gru://fleet/F/instance/I`), which every Session
//! connection presents and later Joins prove themselves with. The agent
//! renews it over the Session at three fifths of its lifetime.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gru_proto::v1 as pb;
use pb::minion_service_client::MinionServiceClient;
use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::config::{ControllerAddress, Controllers, MinionConfig};
use crate::engine::{Engine, EngineStatus, Health};
use crate::imds::{self, Imds};
use crate::metrics::AgentMetrics;

pub const BACKOFF_INITIAL: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on reaching one controller and opening the Session with it: the
/// connection, TLS, HTTP/2, the Join and the Session's answer. A stalled
/// controller accepts TCP connections (the kernel does) and answers
/// nothing; past this, the agent tries the next one.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 pings on the controller connection: a controller that stalls
/// without closing it (its host hung, paused, cut off: the leader a standby
/// takes over from) is noticed within interval + timeout, 10 s, and the
/// agent moves on to the next controller. The controller's resume grace
/// (`gru_controller::registry::RESUME_GRACE`) is this sum.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Used until the controller's settings arrive.
pub const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot read {what} {path}")]
    Read {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid controller address {0:?}")]
    Address(String, #[source] tonic::codegen::http::uri::InvalidUri),
    #[error("invalid TLS settings for the controller")]
    Tls(#[source] tonic::transport::Error),
    #[error("cannot connect to the controller")]
    Connect(#[source] tonic::transport::Error),
    /// The controller took the connection but did not finish the TLS
    /// handshake, the Join or the Session's opening in time (a stopped or
    /// hung process, a listener that is not a controller).
    #[error("the controller did not open the Session within {0:?}")]
    Timeout(Duration),
    /// Cannot be: the config names a controller at least.
    #[error("no controller address to connect to")]
    NoController,
    #[error("the controller refused: {}", .0.message())]
    Refused(tonic::Status),
    #[error("cannot make the minion's key or certificate request")]
    Key(#[source] rcgen::Error),
    #[error("the controller issued no certificate (a controller older than this agent?)")]
    NoCertificate,
    #[error("no join token and no instance metadata to prove this minion with")]
    NoProof,
    #[error("cannot keep the minion's credentials in {path}")]
    Credentials {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not the minion's key (PEM): {detail}")]
    BadKey {
        path: std::path::PathBuf,
        detail: String,
    },
    #[error("failed to start the engine")]
    Engine(#[source] gru_engine::engine::EngineError),
    #[error("failed to start the http engine adapter")]
    HttpEngine(#[source] Box<crate::engine::http::HttpError>),
    #[error("cannot read this instance's identity from the instance metadata service")]
    Identity(#[source] imds::ImdsError),
    #[error("no instance id: none was given and [aws] imds is off")]
    NoInstanceId,
    #[error("cannot serve metrics on {at}")]
    Metrics {
        at: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Exponential backoff with jitter, so minions that lost the controller
/// together do not all come back in the same millisecond.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: BACKOFF_INITIAL,
        }
    }
}

impl Backoff {
    /// A delay in [next/2, next], then doubles `next` up to the maximum.
    pub fn delay(&mut self) -> Duration {
        let cap = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        let half = cap / 2;
        half + half.mul_f64(rand::rng().random::<f64>())
    }

    pub fn reset(&mut self) {
        self.next = BACKOFF_INITIAL;
    }
}

/// The response metadata key in which a standby names the leader's
/// address (`https://host:port`). It is `gru_controller::ha::LEADER_METADATA`:
/// the agent does not depend on the controller crate, and gru's tests check
/// that the two agree.
pub const LEADER_METADATA: &str = "gru-leader";

/// One place to dial: a configured controller address, or one of several
/// addresses its host name resolves to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The configured address this comes from.
    pub configured: String,
    /// What is dialled: the configured address itself, unless its name
    /// resolves to several addresses (then `https://ip:port`, one target
    /// each). The TLS name checked stays the configured `server_name`.
    pub url: String,
    /// The address it resolved to; `None` when it did not resolve (dialling
    /// it then says why).
    pub addr: Option<SocketAddr>,
}

/// `https://a:7070`, or `https://a:7070 (10.0.0.5:7070)` for one of the
/// addresses a name resolves to.
impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.addr {
            Some(addr) if self.url != self.configured => write!(f, "{} ({addr})", self.configured),
            _ => f.write_str(&self.configured),
        }
    }
}

/// Every configured controller, in the configured order; a name that
/// resolves to several addresses as one target each (in the resolver's
/// order), since each may be a different controller. An address reached
/// under two names is dialled once.
pub async fn resolve(controllers: &Controllers) -> Vec<Target> {
    let mut targets: Vec<Target> = Vec::new();
    for c in controllers.addresses() {
        let addrs = lookup(c).await;
        let fresh: Vec<SocketAddr> = addrs
            .iter()
            .copied()
            .filter(|a| !targets.iter().any(|t| t.addr == Some(*a)))
            .collect();
        match (addrs.len(), fresh.as_slice()) {
            // Unresolved: dialled by name, so that the attempt says why.
            (0, _) => targets.push(Target {
                configured: c.url().to_owned(),
                url: c.url().to_owned(),
                addr: None,
            }),
            // An IP address, or a name for one address: dialled as today.
            (1, [a]) => targets.push(Target {
                configured: c.url().to_owned(),
                url: c.url().to_owned(),
                addr: Some(*a),
            }),
            _ => targets.extend(fresh.iter().map(|a| Target {
                configured: c.url().to_owned(),
                url: format!("https://{a}"),
                addr: Some(*a),
            })),
        }
    }
    targets
}

/// The addresses `c`'s host stands for; none when it does not resolve.
async fn lookup(c: &ControllerAddress) -> Vec<SocketAddr> {
    if let Ok(ip) = c.host().parse::<IpAddr>() {
        return vec![SocketAddr::new(ip, c.port())];
    }
    match tokio::net::lookup_host((c.host(), c.port())).await {
        Ok(addrs) => {
            let mut out: Vec<SocketAddr> = Vec::new();
            for a in addrs {
                if !out.contains(&a) {
                    out.push(a);
                }
            }
            out
        }
        Err(e) => {
            tracing::debug!(error = %e, controller = %c, "cannot resolve the controller's name");
            Vec::new()
        }
    }
}

/// The leader's address, when `status` is a standby's answer naming one.
pub fn leader_named(status: &tonic::Status) -> Option<&str> {
    if status.code() != tonic::Code::Unavailable {
        return None;
    }
    status.metadata().get(LEADER_METADATA)?.to_str().ok()
}

/// Which of `targets` the `leader` a standby named is: one whose address
/// the leader's address resolves to, else the one configured as exactly
/// that address. `None` when it is none of them: a leader outside the
/// configured set is not followed (an agent does not go where any answer
/// sends it; its configuration says whom it trusts to be a controller).
pub async fn leader_target(targets: &[Target], leader: &str) -> Option<usize> {
    let leader = ControllerAddress::parse(leader).ok()?;
    let resolved = lookup(&leader).await;
    match_leader(targets, &leader, &resolved)
}

/// [`leader_target`] once the leader's name is resolved (to `resolved`).
fn match_leader(
    targets: &[Target],
    leader: &ControllerAddress,
    resolved: &[SocketAddr],
) -> Option<usize> {
    targets
        .iter()
        .position(|t| t.addr.is_some_and(|a| resolved.contains(&a)))
        .or_else(|| targets.iter().position(|t| t.configured == leader.url()))
}

/// One round over the targets: each tried at most once, in the configured
/// order from where the round starts, except that a standby's leader is
/// tried next (if not tried already).
#[derive(Debug)]
pub struct Round {
    tried: Vec<bool>,
    /// Where the search for the next untried target starts.
    cursor: usize,
    /// A leader to try before the rest.
    follow: Option<usize>,
}

impl Round {
    /// A round over `len` targets starting at `start`.
    pub fn new(len: usize, start: usize) -> Round {
        Round {
            tried: vec![false; len],
            cursor: if len == 0 { 0 } else { start % len },
            follow: None,
        }
    }

    /// Makes `i` the next target; false (and no change) when it was tried
    /// in this round already.
    pub fn follow(&mut self, i: usize) -> bool {
        if self.tried.get(i).copied().unwrap_or(true) {
            return false;
        }
        self.follow = Some(i);
        true
    }
}

/// The targets to try, in turn; ends once every one was tried.
impl Iterator for Round {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        let n = self.tried.len();
        let i = self.follow.take().filter(|&i| !self.tried[i]).or_else(|| {
            (0..n)
                .map(|k| (self.cursor + k) % n)
                .find(|&i| !self.tried[i])
        })?;
        self.tried[i] = true;
        self.cursor = (i + 1) % n;
        Some(i)
    }
}

/// A Session just opened: what [`Agent::in_session`] runs it with.
struct Open {
    tx: mpsc::Sender<pb::SessionMessage>,
    commands: tonic::Streaming<pb::ControllerCommand>,
    interval: Duration,
    not_after: SystemTime,
}

pub struct Agent {
    config: MinionConfig,
    instance_id: String,
    engine: Arc<dyn Engine>,
    tls: ClientTlsConfig,
    /// `None`: the agent joins with the instance's identity document.
    join_token: Option<String>,
    /// With `[aws] imds = true`: the instance may be in a warm pool, and
    /// the agent joins only once the Auto Scaling group puts it in service.
    warm_pool: Option<WarmPoolGate>,
    metrics: AgentMetrics,
    /// Told to the controller at Join, for its `/sd/minions`.
    metrics_address: Option<std::net::SocketAddr>,
    /// A Session was open before: the next one is a reconnect.
    was_connected: std::sync::atomic::AtomicBool,
    /// The minion's key pair, made at start; only its public half leaves.
    key: rcgen::KeyPair,
    /// The certificate the controller last issued for `key`.
    certificate: std::sync::Mutex<Option<Issued>>,
}

/// A certificate the controller issued to this minion.
#[derive(Clone, Debug)]
struct Issued {
    pem: String,
    not_after: SystemTime,
}

impl Issued {
    fn from_pb(c: pb::Certificate) -> Issued {
        Issued {
            pem: c.certificate_pem,
            not_after: UNIX_EPOCH + Duration::from_secs(c.not_after_unix.max(0) as u64),
        }
    }
}

/// How long after receiving a certificate valid until `not_after` the
/// agent asks for a new one: at three fifths of what is left (of its
/// lifetime, for a certificate received as it was issued), before two
/// thirds of it have passed; never sooner than in a second.
pub fn renew_after(now: SystemTime, not_after: SystemTime) -> Duration {
    let left = not_after.duration_since(now).unwrap_or_default();
    (left * 3 / 5).max(Duration::from_secs(1))
}

struct WarmPoolGate {
    imds: Imds,
    poll: Duration,
}

/// How [`Agent::run`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// The shutdown future resolved.
    Shutdown,
    /// The instance left its warm pool to be terminated; it never joined.
    NeverInService,
}

impl Agent {
    pub fn new(
        config: MinionConfig,
        instance_id: String,
        engine: Arc<dyn Engine>,
    ) -> Result<Self, AgentError> {
        gru_proto::install_crypto_provider();
        let read = |what, path: &std::path::Path| {
            std::fs::read(path).map_err(|source| AgentError::Read {
                what,
                path: path.to_owned(),
                source,
            })
        };
        let ca = read("CA certificate", &config.ca_file)?;
        let token = config
            .join_token_file
            .as_deref()
            .map(|path| read("join token", path))
            .transpose()?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .domain_name(config.server_name.clone());
        let warm_pool = config.aws.as_ref().map(|aws| WarmPoolGate {
            imds: Imds::new(aws.imds_endpoint.to_string()),
            poll: aws.warm_pool_poll,
        });
        let (key, certificate) = match &config.state_dir {
            Some(dir) => credentials::load_or_make(dir)?,
            None => (rcgen::KeyPair::generate().map_err(AgentError::Key)?, None),
        };
        Ok(Agent {
            key,
            certificate: std::sync::Mutex::new(certificate),
            join_token: token.map(|t| String::from_utf8_lossy(&t).trim().to_owned()),
            config,
            instance_id,
            engine,
            tls,
            warm_pool,
            metrics: AgentMetrics::default(),
            metrics_address: None,
            was_connected: Default::default(),
        })
    }

    /// Says at Join where this agent serves its metrics.
    pub fn with_metrics_address(mut self, address: std::net::SocketAddr) -> Self {
        self.metrics_address = Some(address);
        self
    }

    /// The agent's own counters (Session, reconnects, reports).
    pub fn metrics(&self) -> &AgentMetrics {
        &self.metrics
    }

    /// The endpoint of the controller at `url`; the connection presents
    /// `certificate`.
    fn endpoint(&self, url: &str, certificate: Option<&Issued>) -> Result<Endpoint, AgentError> {
        let tls = match certificate {
            Some(c) => self
                .tls
                .clone()
                .identity(Identity::from_pem(&c.pem, self.key.serialize_pem())),
            None => self.tls.clone(),
        };
        Channel::from_shared(url.to_owned())
            .map_err(|e| AgentError::Address(url.to_owned(), e))
            .and_then(|e| e.tls_config(tls).map_err(AgentError::Tls))
            .map(|e| {
                e.connect_timeout(CONNECT_TIMEOUT)
                    .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                    .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                    .keep_alive_while_idle(true)
                    .tcp_nodelay(true)
            })
    }

    /// Keeps a Session with the leading controller until `shutdown`
    /// resolves.
    ///
    /// With `[aws] imds = true` it first waits, without contacting the
    /// controller, until the instance's target lifecycle state lets it join
    /// as capacity: an instance in a warm pool (`Warmed:*`) has its engine
    /// started but is not capacity, and joining would have the controller
    /// count it and send it work.
    ///
    /// Each round tries the configured controllers in turn (see [`Round`]),
    /// starting with the one after the one that last took the Session: a standby's answer
    /// sends the agent to the leader it names, if that is one of them; a
    /// controller that cannot be reached, to the next. Only a round in which
    /// none took the Session, or a Session that ended, costs a backoff delay.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> Stopped {
        tokio::pin!(shutdown);
        if let Some(gate) = &self.warm_pool {
            tokio::select! {
                r = imds::wait_until_in_service(&gate.imds, gate.poll) => match r {
                    Ok(state) => tracing::info!(state = %state, "may join as capacity"),
                    Err(e) => {
                        tracing::warn!(error = %e, "not joining");
                        return Stopped::NeverInService;
                    }
                },
                _ = &mut shutdown => return Stopped::Shutdown,
            }
        }
        let mut backoff = Backoff::default();
        // The address that last took the Session. Once that Session ended,
        // the next round starts with the address after it: a controller
        // that stalled or stepped down is tried last, not first (a standby
        // that is asked first names the leader, which may be that one
        // again).
        let mut last: Option<String> = None;
        loop {
            // Resolved again every round: controllers get replaced.
            let targets = tokio::select! {
                t = resolve(&self.config.controller) => t,
                _ = &mut shutdown => return Stopped::Shutdown,
            };
            let start = last
                .as_ref()
                .and_then(|url| targets.iter().position(|t| &t.url == url))
                .map_or(0, |i| (i + 1) % targets.len());
            let opened = tokio::select! {
                r = self.connect(&targets, start) => r,
                _ = &mut shutdown => return Stopped::Shutdown,
            };
            let result = match opened {
                Ok((i, open)) => {
                    last = Some(targets[i].url.clone());
                    backoff.reset();
                    if self
                        .was_connected
                        .swap(true, std::sync::atomic::Ordering::Relaxed)
                    {
                        self.metrics.reconnects.inc();
                    }
                    self.metrics.connected.set(1);
                    let result = tokio::select! {
                        r = self.in_session(open.tx, open.commands, open.interval, open.not_after) => r,
                        _ = &mut shutdown => return Stopped::Shutdown,
                    };
                    self.metrics.connected.set(0);
                    result
                }
                Err(e) => Err(e),
            };
            let delay = backoff.delay();
            match result {
                Ok(()) => tracing::info!(retry_in = ?delay, "session closed by the controller"),
                Err(e) => {
                    tracing::warn!(error = %crate::error_chain(&e), retry_in = ?delay, "session failed")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = &mut shutdown => return Stopped::Shutdown,
            }
        }
    }

    /// One round over `targets` from `start` (see [`Round`]): the Session
    /// the first controller to take it opened, with that target's index, or
    /// the last attempt's error. Logs each move from one controller to the
    /// next, with why.
    async fn connect(&self, targets: &[Target], start: usize) -> Result<(usize, Open), AgentError> {
        let mut round = Round::new(targets.len(), start);
        // Why the last attempt failed, said with where the agent goes next;
        // `true` when the round's error would not say it (a leader not
        // followed), so that it is said even when no attempt follows.
        let mut moving: Option<(usize, String, bool)> = None;
        let mut failure = AgentError::NoController;
        while let Some(i) = round.next() {
            let target = &targets[i];
            if let Some((from, why, _)) = moving.take() {
                tracing::warn!("controller {} {why}; trying {target}", targets[from]);
            }
            let e = match tokio::time::timeout(OPEN_TIMEOUT, self.open(target)).await {
                Ok(Ok(open)) => return Ok((i, open)),
                Ok(Err(e)) => e,
                Err(_) => AgentError::Timeout(OPEN_TIMEOUT),
            };
            let leader = match &e {
                AgentError::Refused(status) => leader_named(status),
                _ => None,
            };
            moving = match leader {
                None => Some((
                    i,
                    format!("did not take the Session ({})", crate::error_chain(&e)),
                    false,
                )),
                Some(leader) => match leader_target(targets, leader).await {
                    Some(j) if round.follow(j) => {
                        tracing::info!(
                            "controller {target} is a standby; following the leader at {leader}"
                        );
                        None
                    }
                    Some(_) => Some((
                        i,
                        format!(
                            "is a standby; the leader it names, {leader}, was tried in this round already"
                        ),
                        false,
                    )),
                    None => Some((
                        i,
                        format!(
                            "is a standby and names the leader at {leader}, which is not a configured controller; not following it"
                        ),
                        true,
                    )),
                },
            };
            failure = e;
        }
        if let Some((from, why, true)) = moving {
            tracing::warn!("controller {} {why}", targets[from]);
        }
        Err(failure)
    }

    /// A certificate request for the minion's key.
    fn csr(&self) -> Result<String, AgentError> {
        rcgen::CertificateParams::default()
            .serialize_request(&self.key)
            .and_then(|r| r.pem())
            .map_err(AgentError::Key)
    }

    /// The certificate, unless it expires within a minute (a connection
    /// presenting it might not be accepted by the time it is made).
    fn current_certificate(&self) -> Option<Issued> {
        let c = self.certificate.lock().ok()?.clone()?;
        (c.not_after > SystemTime::now() + Duration::from_secs(60)).then_some(c)
    }

    fn keep_certificate(&self, c: Issued) {
        let expiry = c.not_after.duration_since(UNIX_EPOCH).unwrap_or_default();
        self.metrics.certificate_expiry.set(expiry.as_secs() as i64);
        if let Some(dir) = &self.config.state_dir {
            // Kept for the next start; a failure costs only that.
            if let Err(e) = credentials::save_certificate(dir, &c) {
                tracing::warn!(error = %crate::error_chain(&e), "cannot keep the minion certificate");
            }
        }
        if let Ok(mut held) = self.certificate.lock() {
            *held = Some(c);
        }
    }

    /// Joins the controller at `target` and opens the Session: with the
    /// certificate when the agent has one (whichever controller issued it:
    /// they share the minion CA), else with the join token or the
    /// instance's identity document.
    async fn open(&self, target: &Target) -> Result<Open, AgentError> {
        let held = self.current_certificate();
        let channel = self
            .endpoint(&target.url, held.as_ref())?
            .connect()
            .await
            .map_err(AgentError::Connect)?;
        let mut client = MinionServiceClient::new(channel);
        // With a certificate, it is the proof; without (the first Join, or
        // after it expired), the join token or, on AWS without one, the
        // instance's signed identity document.
        let identity = match (&held, &self.join_token, &self.warm_pool) {
            (Some(_), _, _) => pb::join_request::Identity::Certificate(pb::MinionCertificate {}),
            (None, Some(token), _) => pb::join_request::Identity::JoinToken(token.clone()),
            (None, None, Some(gate)) => {
                let signed = gate
                    .imds
                    .signed_identity_document()
                    .await
                    .map_err(AgentError::Identity)?;
                pb::join_request::Identity::InstanceIdentity(pb::InstanceIdentity {
                    document: signed.document,
                    signature: signed.signature,
                })
            }
            (None, None, None) => return Err(AgentError::NoProof),
        };
        let joined = client
            .join(pb::JoinRequest {
                fleet: self.config.fleet.clone(),
                instance_id: self.instance_id.clone(),
                engine_address: self.engine.address().to_string(),
                identity: Some(identity),
                agent_version: env!("CARGO_PKG_VERSION").to_owned(),
                metrics_address: self
                    .metrics_address
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
                csr_pem: self.csr()?,
            })
            .await
            .map_err(|status| {
                if held.is_some()
                    && matches!(
                        status.code(),
                        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                    )
                {
                    // Not accepted any more (a new minion CA, a controller
                    // that forgot this minion): the next attempt starts over.
                    if let Ok(mut c) = self.certificate.lock() {
                        *c = None;
                    }
                }
                AgentError::Refused(status)
            })?
            .into_inner();
        let issued = Issued::from_pb(joined.certificate.ok_or(AgentError::NoCertificate)?);
        self.keep_certificate(issued.clone());
        if held.is_none() {
            // The Session's connection must present the certificate.
            let channel = self
                .endpoint(&target.url, Some(&issued))?
                .connect()
                .await
                .map_err(AgentError::Connect)?;
            client = MinionServiceClient::new(channel);
        }
        let interval = joined
            .settings
            .map(|s| Duration::from_millis(u64::from(s.report_interval_ms)))
            .filter(|d| !d.is_zero())
            .unwrap_or(DEFAULT_REPORT_INTERVAL);
        tracing::info!(minion = %joined.minion_id, controller = %target, "joined fleet {}", self.config.fleet);

        let (tx, rx) = mpsc::channel(8);
        let hello = pb::SessionMessage {
            body: Some(pb::session_message::Body::Hello(pb::SessionHello {
                minion_id: joined.minion_id.clone(),
                session_token: joined.session_token,
            })),
        };
        // The channel was just made with room: this cannot fail.
        let _ = tx.try_send(hello);
        let commands = client
            .session(ReceiverStream::new(rx))
            .await
            .map_err(AgentError::Refused)?
            .into_inner();
        Ok(Open {
            tx,
            commands,
            interval,
            not_after: issued.not_after,
        })
    }

    /// Reports every interval and obeys commands until the Session ends.
    async fn in_session(
        &self,
        tx: mpsc::Sender<pb::SessionMessage>,
        mut commands: tonic::Streaming<pb::ControllerCommand>,
        mut interval: Duration,
        not_after: SystemTime,
    ) -> Result<(), AgentError> {
        let mut seq = 0u64;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let renew = tokio::time::sleep(renew_after(SystemTime::now(), not_after));
        tokio::pin!(renew);
        loop {
            tokio::select! {
                () = &mut renew => {
                    let request = pb::SessionMessage {
                        body: Some(pb::session_message::Body::Renew(pb::RenewCertificate {
                            csr_pem: self.csr()?,
                        })),
                    };
                    if tx.send(request).await.is_err() {
                        return Ok(());
                    }
                    // Asked again if no answer comes (the next renewal
                    // moves it on when one does).
                    renew.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(60));
                }
                _ = tick.tick() => {
                    seq += 1;
                    let report = report(seq, self.engine.status(), self.engine.can_shed());
                    if tx.send(report).await.is_err() {
                        return Ok(());
                    }
                    self.metrics.reports.inc();
                }
                cmd = commands.message() => {
                    let Some(cmd) = cmd.map_err(AgentError::Refused)? else { return Ok(()) };
                    match cmd.command {
                        Some(pb::controller_command::Command::Drain(d)) => {
                            tracing::info!(reason = %d.reason, deadline_ms = d.deadline_ms, "draining");
                            self.engine.drain();
                        }
                        Some(pb::controller_command::Command::Resume(_)) => {
                            tracing::info!("resuming intake");
                            self.engine.resume();
                        }
                        Some(pb::controller_command::Command::Shed(s)) => {
                            let closing = self.engine.shed(s.count);
                            tracing::info!(asked = s.count, closing, reason = %s.reason, "shedding connections");
                        }
                        Some(pb::controller_command::Command::Certificate(c)) => {
                            let issued = Issued::from_pb(c);
                            tracing::info!(
                                valid_for = ?issued.not_after.duration_since(SystemTime::now()).unwrap_or_default(),
                                "minion certificate renewed"
                            );
                            renew.as_mut().reset(
                                tokio::time::Instant::now()
                                    + renew_after(SystemTime::now(), issued.not_after),
                            );
                            self.keep_certificate(issued);
                        }
                        Some(pb::controller_command::Command::Settings(s)) => {
                            let d = Duration::from_millis(u64::from(s.report_interval_ms));
                            if !d.is_zero() && d != interval {
                                interval = d;
                                tick = tokio::time::interval(interval);
                            }
                        }
                        None => tracing::warn!("empty command ignored"),
                    }
                }
            }
        }
    }
}

fn report(seq: u64, s: EngineStatus, can_shed: bool) -> pb::SessionMessage {
    let health = match s.health {
        Health::Starting => pb::EngineHealth::Starting,
        Health::Healthy => pb::EngineHealth::Healthy,
        Health::Unhealthy => pb::EngineHealth::Unhealthy,
    };
    pb::SessionMessage {
        body: Some(pb::session_message::Body::Report(pb::MinionReport {
            seq,
            queue_depth: s.queue_depth,
            in_flight: s.in_flight,
            processed_total: s.processed_total,
            failed_total: s.failed_total,
            health: health as i32,
            open_connections: s.open_connections,
            draining: s.draining,
            drained: s.drained,
            sent_at_unix_us: gru_proto::report_stamp(),
            can_shed,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_is_renewed_before_two_thirds_of_its_lifetime() {
        let issued = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let day = Duration::from_secs(24 * 3600);
        // Received as issued: renewed after 3/5 of the day, with 2/5 left.
        let after = renew_after(issued, issued + day);
        assert_eq!(after, day * 3 / 5);
        assert!(after < day * 2 / 3);
        // Received (or kept from before a restart) with 10 hours left:
        // renewed after 6 of them.
        let hours = |h: u64| Duration::from_secs(h * 3600);
        assert_eq!(renew_after(issued, issued + hours(10)), hours(6));
        // Expired, or about to: asked for again within a second.
        assert_eq!(
            renew_after(issued + day, issued + day / 2),
            Duration::from_secs(1)
        );
        assert_eq!(
            renew_after(issued, issued + Duration::from_millis(500)),
            Duration::from_secs(1)
        );
    }

    fn controllers(list: &[&str]) -> Controllers {
        Controllers::parse(list.iter().map(|a| ("controller".to_owned(), *a))).unwrap()
    }

    fn target(configured: &str, url: &str, addr: Option<&str>) -> Target {
        Target {
            configured: configured.to_owned(),
            url: url.to_owned(),
            addr: addr.map(|a| a.parse().unwrap()),
        }
    }

    #[tokio::test]
    async fn ip_addresses_are_dialled_as_written_and_once() {
        let t = resolve(&controllers(&[
            "https://10.0.0.1:7070",
            "https://[::1]:7070/",
            "https://10.0.0.2",
        ]))
        .await;
        assert_eq!(
            t,
            vec![
                target(
                    "https://10.0.0.1:7070",
                    "https://10.0.0.1:7070",
                    Some("10.0.0.1:7070")
                ),
                target(
                    "https://[::1]:7070",
                    "https://[::1]:7070",
                    Some("[::1]:7070")
                ),
                target("https://10.0.0.2", "https://10.0.0.2", Some("10.0.0.2:443")),
            ]
        );
        assert_eq!(t[0].to_string(), "https://10.0.0.1:7070");
        let by_name = target(
            "https://ctl:7070",
            "https://10.0.0.9:7070",
            Some("10.0.0.9:7070"),
        );
        assert_eq!(by_name.to_string(), "https://ctl:7070 (10.0.0.9:7070)");
    }

    #[test]
    fn a_leader_is_followed_only_to_a_configured_controller() {
        let targets = [
            target(
                "https://10.0.0.1:7070",
                "https://10.0.0.1:7070",
                Some("10.0.0.1:7070"),
            ),
            target(
                "https://ctl:7070",
                "https://10.0.0.2:7070",
                Some("10.0.0.2:7070"),
            ),
            target(
                "https://ctl:7070",
                "https://10.0.0.3:7070",
                Some("10.0.0.3:7070"),
            ),
            target("https://gone:7070", "https://gone:7070", None),
        ];
        let m = |leader: &str, resolved: &[&str]| {
            let resolved: Vec<SocketAddr> = resolved.iter().map(|a| a.parse().unwrap()).collect();
            match_leader(
                &targets,
                &ControllerAddress::parse(leader).unwrap(),
                &resolved,
            )
        };
        assert_eq!(m("https://10.0.0.1:7070", &["10.0.0.1:7070"]), Some(0));
        // Named differently from the configuration, at a configured address.
        assert_eq!(
            m("https://ctl-c.internal:7070", &["10.0.0.3:7070"]),
            Some(2)
        );
        // A configured name that does not resolve here.
        assert_eq!(m("https://gone:7070", &[]), Some(3));
        // Outside the set: another port, another host.
        assert_eq!(m("https://10.0.0.1:7071", &["10.0.0.1:7071"]), None);
        assert_eq!(m("https://evil.example:7070", &["192.0.2.1:7070"]), None);
    }

    #[test]
    fn a_round_tries_each_target_once_and_the_leader_next() {
        let all = |r: &mut Round| r.collect::<Vec<_>>();
        assert_eq!(all(&mut Round::new(1, 0)), vec![0]);
        assert_eq!(all(&mut Round::new(3, 1)), vec![1, 2, 0]);
        let mut r = Round::new(4, 0);
        assert_eq!(r.next(), Some(0));
        // Target 0 is a standby naming 2 as the leader.
        assert!(r.follow(2));
        assert_eq!(r.next(), Some(2));
        // 2 names 0 back: tried already in this round.
        assert!(!r.follow(0));
        assert_eq!(all(&mut r), vec![3, 1]);
        assert!(!r.follow(1));
    }

    #[test]
    fn only_an_unavailable_answer_names_a_leader() {
        let mut standby = tonic::Status::unavailable("a standby");
        standby
            .metadata_mut()
            .insert(LEADER_METADATA, "https://10.0.0.2:7070".parse().unwrap());
        assert_eq!(leader_named(&standby), Some("https://10.0.0.2:7070"));
        assert_eq!(leader_named(&tonic::Status::unavailable("no leader")), None);
        let mut other = tonic::Status::permission_denied("no");
        other
            .metadata_mut()
            .insert(LEADER_METADATA, "https://10.0.0.2:7070".parse().unwrap());
        assert_eq!(leader_named(&other), None);
    }

    #[test]
    fn backoff_grows_jittered_and_capped() {
        let mut b = Backoff::default();
        let mut cap = BACKOFF_INITIAL;
        for _ in 0..20 {
            let d = b.delay();
            assert!(
                d >= cap / 2 && d <= cap,
                "{d:?} outside [{:?}, {cap:?}]",
                cap / 2
            );
            cap = (cap * 2).min(BACKOFF_MAX);
        }
        b.reset();
        assert!(b.delay() <= BACKOFF_INITIAL);
    }
}

/// The minion's key and last certificate on disk (`state_dir`), so that a
/// restarted agent rejoins with its certificate.
mod credentials {
    use std::path::Path;
    use std::time::{Duration, UNIX_EPOCH};

    use super::{AgentError, Issued};

    const KEY: &str = "minion.key";
    const CERT: &str = "minion.pem";
    /// The certificate's expiry, Unix seconds (read back without parsing
    /// the certificate).
    const EXPIRY: &str = "minion.expiry";

    fn write(path: &Path, contents: &str, mode: u32) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let staged = path.with_extension("new");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&staged)?;
        f.write_all(contents.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&staged, path)
    }

    /// The key in `dir` (made there, owner-only, when there is none) and
    /// the certificate kept with it, if any.
    pub(super) fn load_or_make(dir: &Path) -> Result<(rcgen::KeyPair, Option<Issued>), AgentError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| AgentError::Credentials { path, source }
        };
        let key_path = dir.join(KEY);
        let key = match std::fs::read_to_string(&key_path) {
            Ok(pem) => rcgen::KeyPair::from_pem(&pem).map_err(|e| AgentError::BadKey {
                path: key_path.clone(),
                detail: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(dir).map_err(io(dir))?;
                let key = rcgen::KeyPair::generate().map_err(AgentError::Key)?;
                write(&key_path, &key.serialize_pem(), 0o600).map_err(io(&key_path))?;
                key
            }
            Err(e) => return Err(io(&key_path)(e)),
        };
        let cert = std::fs::read_to_string(dir.join(CERT)).ok();
        let expiry = std::fs::read_to_string(dir.join(EXPIRY))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok());
        let issued = cert.zip(expiry).map(|(pem, secs)| Issued {
            pem,
            not_after: UNIX_EPOCH + Duration::from_secs(secs),
        });
        Ok((key, issued))
    }

    pub(super) fn save_certificate(dir: &Path, c: &Issued) -> Result<(), AgentError> {
        let io = |path: std::path::PathBuf| move |source| AgentError::Credentials { path, source };
        let expiry = c.not_after.duration_since(UNIX_EPOCH).unwrap_or_default();
        // The expiry after the certificate: a crash between the two leaves
        // an older expiry, which only makes the agent renew sooner.
        write(&dir.join(CERT), &c.pem, 0o644).map_err(io(dir.join(CERT)))?;
        write(&dir.join(EXPIRY), &expiry.as_secs().to_string(), 0o644).map_err(io(dir.join(EXPIRY)))
    }
}
