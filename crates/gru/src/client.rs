//! How the CLI finds and reaches the controller: a small TOML client config
//! (written by `gru dev`), TLS with a client certificate, a deadline on
//! every step (TCP, the TLS handshake, the call), and errors a person can act
//! on instead of `transport error`: each says what the CLI waited for, or
//! which check of the controller's certificate failed ([`ReachError`]).
//!
//! With several controllers (one leads, the others are standbys; DESIGN.md,
//! High availability) the CLI connects to the first that answers and, when
//! a standby answers a call with the leader's address, makes the call again
//! there once ([`Admin::call`]), if the leader is one of the configured
//! controllers: the same rule, and the same code, as the minion agent's
//! (`gru_minion::agent::{resolve, leader_target}`).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use gru_minion::agent::{Target, leader_named, leader_target, resolve};
use gru_minion::config::Controllers;
use gru_proto::v1::admin_service_client::AdminServiceClient;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// The admin API's client, on one controller's connection.
pub type AdminClient = AdminServiceClient<Channel>;

pub const CONFIG_ENV: &str = "GRU_CONFIG";
/// How long a command waits for the controller unless `--timeout` says
/// otherwise: connecting, the TLS handshake and the call together. Also the
/// bound on each step of a `--wait`, whose own timeout is longer.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the CLI finds the controller and its credentials.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The controller's address; several controllers' separated by commas.
    /// In the file, a string (one address, or several with commas) or a
    /// list of addresses; written back as it was read. A string keeps the
    /// configs that `gru dev` and `gru cert issue` write unchanged.
    #[serde(
        deserialize_with = "addresses::deserialize",
        serialize_with = "addresses::serialize"
    )]
    pub controller: String,
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    #[serde(default = "default_server_name")]
    pub server_name: String,
}

fn default_server_name() -> String {
    gru_controller::pki::SERVER_NAME.to_owned()
}

/// `gru dev`'s state directory when none is given.
pub fn default_state_dir() -> PathBuf {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("gru/dev")
}

/// `--config`, else `$GRU_CONFIG`, else the one `gru dev` wrote.
pub fn config_path(explicit: Option<&Path>) -> PathBuf {
    explicit
        .map(Path::to_owned)
        .or_else(|| std::env::var_os(CONFIG_ENV).map(PathBuf::from))
        .unwrap_or_else(|| default_state_dir().join("client.toml"))
}

impl ClientConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read the client config {} (start `gru dev`, which writes it, or pass --config / set {CONFIG_ENV})",
                path.display()
            )
        })?;
        let mut c: ClientConfig = toml::from_str(&text)
            .map_err(|e| anyhow!("{}: {}", path.display(), e.to_string().trim_end()))?;
        parse_controllers(&c.addresses(), Some(path), "controller")?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut c.ca_file, &mut c.cert_file, &mut c.key_file] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(c)
    }

    /// `controller`, split at its commas.
    fn addresses(&self) -> Vec<&str> {
        split_addresses(&self.controller)
    }
}

fn split_addresses(list: &str) -> Vec<&str> {
    list.split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .collect()
}

/// Checks `addresses`, from `key` (the client config's `controller`, or
/// `--controller`) in `file` (none for a flag). gRPC to the controller is
/// always TLS: an address without https:// is refused with a hint rather
/// than left to the URI parser or the transport to fail in its own words.
fn parse_controllers(
    addresses: &[&str],
    file: Option<&Path>,
    key: &str,
) -> anyhow::Result<Controllers> {
    let at = |k: &str| match file {
        Some(f) => format!("{}: {k}", f.display()),
        None => k.to_owned(),
    };
    let key_of = |i: usize| {
        if addresses.len() == 1 {
            key.to_owned()
        } else {
            format!("{key}[{i}]")
        }
    };
    for (i, a) in addresses.iter().enumerate() {
        if !a.starts_with("https://") {
            let hint = if a.contains("://") {
                String::new()
            } else {
                format!(" (did you mean \"https://{a}\"?)")
            };
            bail!(
                "{}: expected an https:// address like \"https://127.0.0.1:7070\", got {a:?}{hint}",
                at(&key_of(i))
            );
        }
    }
    Controllers::parse(addresses.iter().enumerate().map(|(i, a)| (key_of(i), *a)))
        .map_err(|(k, expected)| anyhow!("{}: {expected}", at(&k)))
}

/// `controller` in the client config: a string or a list of strings, kept
/// as one string with commas (see [`ClientConfig::controller`]).
mod addresses {
    use serde::de::{self, SeqAccess, Visitor};
    use serde::ser::SerializeSeq;
    use serde::{Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        struct OneOrMany;
        impl<'de> Visitor<'de> for OneOrMany {
            type Value = String;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "an address like \"https://10.0.0.2:7070\" or a list of controllers' addresses",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
                Ok(v.to_owned())
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<String, A::Error> {
                let mut all: Vec<String> = Vec::new();
                while let Some(a) = seq.next_element::<String>()? {
                    if a.contains(',') {
                        return Err(de::Error::custom(format!(
                            "one address per list item, got {a:?}"
                        )));
                    }
                    all.push(a);
                }
                Ok(all.join(", "))
            }
        }
        d.deserialize_any(OneOrMany)
    }

    pub fn serialize<S: Serializer>(value: &str, s: S) -> Result<S::Ok, S::Error> {
        if !value.contains(',') {
            return s.serialize_str(value);
        }
        let all = super::split_addresses(value);
        let mut seq = s.serialize_seq(Some(all.len()))?;
        for a in all {
            seq.serialize_element(a)?;
        }
        seq.end()
    }
}

/// When a command gives up on the controller. It remembers the whole budget
/// too, so an error says "within 10s", not the few milliseconds left.
#[derive(Clone, Copy, Debug)]
pub struct Deadline {
    at: Instant,
    budget: Duration,
}

impl Deadline {
    pub fn after(budget: Duration) -> Deadline {
        Deadline {
            at: Instant::now() + budget,
            budget,
        }
    }

    /// The earlier of the two: one step of a wait is bounded by its own
    /// deadline and by the wait's.
    pub fn min(self, other: Deadline) -> Deadline {
        if other.at < self.at { other } else { self }
    }

    fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    pub fn at(&self) -> Instant {
        self.at
    }

    /// The whole budget, for an error ("within 10s").
    pub fn budget(&self) -> Duration {
        self.budget
    }
}

/// What the CLI was waiting for when its deadline passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// The TCP connection: nothing answered (a host that is down, a
    /// firewall that drops packets).
    Tcp,
    /// TCP connected, but the TLS handshake never completed: something that
    /// is not a TLS server listens there.
    Handshake,
    /// Connected; this call got no reply.
    Reply(&'static str),
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stage::Tcp => write!(
                f,
                "the TCP connection never completed — is the host up, and is the port open in its firewall?"
            ),
            Stage::Handshake => write!(
                f,
                "TCP connected; the TLS handshake never completed — is this the controller's gRPC port?"
            ),
            Stage::Reply(call) => write!(
                f,
                "connected; the {call} call got no reply — is the controller overloaded or stuck?"
            ),
        }
    }
}

/// Why the CLI did not get an answer from the controller. Each message names
/// the controller's address and what failed; the rustls or hyper detail is
/// left out when the message already says it.
#[derive(Debug, thiserror::Error)]
pub enum ReachError {
    #[error(
        "cannot reach the controller at {address}: connection refused (is `gru dev` or `gru controller` running?)"
    )]
    Refused { address: String },
    #[error("no answer from the controller at {address} within {} ({stage})", humantime::format_duration(*.within))]
    NoAnswer {
        address: String,
        within: Duration,
        stage: Stage,
    },
    /// The certificate is signed by the CA (rustls checks that first) but
    /// does not name the host the client asked for.
    #[error(
        "the controller at {address} presented a certificate that is not valid for the name {server_name:?} (server_name in {}){}",
        config.display(),
        valid_for_text(.valid_for)
    )]
    WrongName {
        address: String,
        server_name: String,
        config: PathBuf,
        /// The names the certificate is valid for, when rustls said.
        valid_for: Option<Vec<String>>,
    },
    #[error(
        "the controller at {address} presented a certificate not signed by the CA in {} (ca_file in {})",
        ca.display(),
        config.display()
    )]
    UnknownCa {
        address: String,
        ca: PathBuf,
        config: PathBuf,
    },
    #[error("the controller at {address} presented a certificate this client refuses: {detail}")]
    BadCertificate { address: String, detail: String },
    /// A call the controller answered with an error, or a connection that
    /// broke in a way none of the above describes.
    #[error("{message}")]
    Call {
        message: String,
        /// Worth trying again: the controller may be restarting.
        transient: bool,
    },
    /// Several controllers were tried and none answered: what each said,
    /// in the order tried (one line each).
    #[error("no controller answered; tried {}:{}", .0.len(), tried_text(.0))]
    Tried(Vec<ReachError>),
}

impl ReachError {
    /// A controller that is down, restarting or slow, rather than a client
    /// that is set up wrong: trying again later may work.
    pub fn is_transient(&self) -> bool {
        match self {
            ReachError::Refused { .. } | ReachError::NoAnswer { .. } => true,
            ReachError::WrongName { .. }
            | ReachError::UnknownCa { .. }
            | ReachError::BadCertificate { .. } => false,
            ReachError::Call { transient, .. } => *transient,
            ReachError::Tried(all) => all.iter().any(ReachError::is_transient),
        }
    }

    /// `tried` as one error: the only one as it is, several as
    /// [`ReachError::Tried`].
    fn of(mut tried: Vec<ReachError>) -> ReachError {
        if tried.len() == 1 {
            tried.remove(0)
        } else {
            ReachError::Tried(tried)
        }
    }
}

fn tried_text(all: &[ReachError]) -> String {
    all.iter().map(|e| format!("\n  {e}")).collect()
}

fn valid_for_text(names: &Option<Vec<String>>) -> String {
    match names.as_deref() {
        None => String::new(),
        Some([]) => "; it names no host at all".to_owned(),
        Some(names) => format!("; it is valid for: {}", names.join(", ")),
    }
}

/// True when `e` is a [`ReachError`] worth trying again.
pub fn is_transient(e: &anyhow::Error) -> bool {
    e.downcast_ref::<ReachError>()
        .is_some_and(ReachError::is_transient)
}

/// A connection to a controller, the deadline its calls share, and how to
/// reach the other configured controllers when it turns out to be a
/// standby. Cloned for each poll of a wait.
#[derive(Clone)]
pub struct Admin {
    pub client: AdminClient,
    pub to: Controller,
    reach: Arc<Reach>,
    /// Which of `reach`'s targets `client` talks to.
    at: usize,
    /// What the controllers tried before this one said, for an error.
    tried: Vec<Arc<ReachError>>,
}

/// Where calls go and until when they may take.
#[derive(Clone, Debug)]
pub struct Controller {
    pub address: String,
    pub deadline: Deadline,
}

/// The configured controllers and the credentials to reach each of them.
pub struct Reach {
    /// The client config, named in errors.
    config: PathBuf,
    ca_file: PathBuf,
    server_name: String,
    tls: ClientTlsConfig,
    /// Every configured controller, names resolved (one target for each
    /// address a name stands for).
    targets: Vec<Target>,
    /// As configured, for errors.
    controllers: Controllers,
}

impl Reach {
    /// Reads the client config named by `config` (see [`config_path`]); the
    /// `--controller` addresses in `controllers`, when any, replace its
    /// `controller`. Names are resolved within `deadline`.
    pub async fn load(
        config: Option<&Path>,
        controllers: &[String],
        deadline: Deadline,
    ) -> anyhow::Result<Reach> {
        gru_proto::install_crypto_provider();
        let path = config_path(config);
        let c = ClientConfig::load(&path)?;
        let controllers = if controllers.is_empty() {
            parse_controllers(&c.addresses(), Some(&path), "controller")?
        } else {
            let flags: Vec<&str> = controllers.iter().map(|a| a.trim()).collect();
            parse_controllers(&flags, None, "--controller")?
        };
        let read = |p: &Path, what: &str| {
            std::fs::read(p).with_context(|| format!("cannot read the {what} {}", p.display()))
        };
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&c.ca_file, "CA certificate")?))
            .identity(Identity::from_pem(
                read(&c.cert_file, "client certificate")?,
                read(&c.key_file, "client key")?,
            ))
            .domain_name(c.server_name.clone());
        let targets = tokio::time::timeout_at(deadline.at, resolve(&controllers))
            .await
            .map_err(|_| {
                anyhow!(
                    "cannot resolve the controllers' names ({controllers}) within {}",
                    humantime::format_duration(deadline.budget)
                )
            })?;
        Ok(Reach {
            config: path,
            ca_file: c.ca_file,
            server_name: c.server_name,
            tls,
            targets,
            controllers,
        })
    }

    /// Every configured controller, as dialled.
    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// Connects to target `i`: TCP and the TLS handshake, both within
    /// `deadline`.
    pub async fn dial(&self, i: usize, deadline: Deadline) -> Result<AdminClient, ReachError> {
        let target = &self.targets[i];
        let address = target.to_string();
        // The TCP connect gets a little less than the whole budget, so that
        // when the budget runs out first, TCP had connected and the wait was
        // for the TLS handshake.
        let remaining = deadline.remaining();
        let endpoint = Channel::from_shared(target.url.clone())
            .map_err(|e| ReachError::Call {
                message: format!("{address}: not a valid address: {e}"),
                transient: false,
            })?
            .tls_config(self.tls.clone())
            .map_err(|e| ReachError::Call {
                message: format!("invalid TLS settings: {}", gru_core::error_chain(&e)),
                transient: false,
            })?
            .connect_timeout(remaining.saturating_sub(remaining / 10));
        match tokio::time::timeout_at(deadline.at, endpoint.connect()).await {
            Ok(Ok(channel)) => Ok(AdminServiceClient::new(channel)),
            Ok(Err(e)) => {
                let detail = gru_core::error_chain(&e);
                Err(self.explain_connect(address, deadline, &detail))
            }
            Err(_) => Err(ReachError::NoAnswer {
                address,
                within: deadline.budget,
                stage: Stage::Handshake,
            }),
        }
    }

    /// The deadline of one of `untried` attempts left within `deadline`:
    /// all of it with one controller, else an equal share of what is left,
    /// so that one controller that never answers leaves time for the rest.
    fn attempt(&self, deadline: Deadline, untried: usize) -> Deadline {
        if self.targets.len() == 1 || untried <= 1 {
            return deadline;
        }
        let share = deadline.remaining() / u32::try_from(untried).unwrap_or(u32::MAX);
        Deadline::after(Duration::from_millis(share.as_millis() as u64)).min(deadline)
    }

    /// Turns a failed connect (its error chain as text: tonic's transport
    /// error keeps the rustls and io errors only as sources) into a
    /// [`ReachError`].
    fn explain_connect(&self, address: String, deadline: Deadline, detail: &str) -> ReachError {
        if detail.contains("Connection refused") || detail.contains("connection refused") {
            ReachError::Refused { address }
        } else if let Some(valid_for) = name_mismatch(detail) {
            ReachError::WrongName {
                address,
                server_name: self.server_name.clone(),
                config: self.config.clone(),
                valid_for,
            }
        } else if detail.contains("UnknownIssuer") {
            ReachError::UnknownCa {
                address,
                ca: self.ca_file.clone(),
                config: self.config.clone(),
            }
        } else if let Some(cert) = detail.rsplit_once("invalid peer certificate: ") {
            ReachError::BadCertificate {
                address,
                detail: cert.1.to_owned(),
            }
        } else if detail.contains("tcp connect error")
            && (detail.contains("elapsed") || detail.contains("timed out"))
        {
            ReachError::NoAnswer {
                address,
                within: deadline.budget,
                stage: Stage::Tcp,
            }
        } else {
            ReachError::Call {
                message: format!("cannot reach the controller at {address}: {detail}"),
                transient: true,
            }
        }
    }
}

/// Connects to the first of the configured controllers that answers (the
/// client config's, or `controllers` from `--controller`): TCP and the TLS
/// handshake, all within `deadline`.
pub async fn connect(
    config: Option<&Path>,
    controllers: &[String],
    deadline: Deadline,
) -> anyhow::Result<Admin> {
    let reach = Arc::new(Reach::load(config, controllers, deadline).await?);
    let n = reach.targets.len();
    let mut tried = Vec::new();
    for i in 0..n {
        match reach
            .dial(i, reach.attempt(deadline, n - tried.len()))
            .await
        {
            Ok(client) => {
                return Ok(Admin {
                    client,
                    to: Controller {
                        address: reach.targets[i].to_string(),
                        deadline,
                    },
                    at: i,
                    reach,
                    tried: tried.into_iter().map(Arc::new).collect(),
                });
            }
            Err(e) => tried.push(e),
        }
    }
    Err(ReachError::of(tried).into())
}

impl Admin {
    /// Makes a call (`what` names it in an error) within the deadline, and
    /// turns a failure into a sentence. A standby's answer naming the
    /// leader makes the call again, once, at the leader (if it is one of
    /// the configured controllers); later calls go there too.
    pub async fn call<T>(
        &mut self,
        what: &'static str,
        mut call: impl AsyncFnMut(&mut AdminClient) -> Result<tonic::Response<T>, tonic::Status>,
    ) -> anyhow::Result<T> {
        let status = match self.attempt(what, &mut call).await? {
            Ok(v) => return Ok(v),
            Err(s) => s,
        };
        let Some(leader) = leader_named(&status).map(str::to_owned) else {
            return Err(self.failed(explain_status(&self.to.address, status)));
        };
        let standby = explain_status(&self.to.address, status);
        let j = match leader_target(&self.reach.targets, &leader).await {
            Some(j) if j != self.at => j,
            Some(_) => return Err(self.failed(standby)),
            None => {
                let outside = ReachError::Call {
                    message: format!(
                        "{standby}; the CLI does not follow it: {leader} is not one of the configured controllers ({}; controller in {}, or --controller)",
                        self.reach.controllers,
                        self.reach.config.display()
                    ),
                    transient: false,
                };
                return Err(self.failed(outside));
            }
        };
        self.tried.push(Arc::new(standby));
        match self.reach.dial(j, self.to.deadline).await {
            Ok(client) => {
                self.client = client;
                self.at = j;
                self.to.address = self.reach.targets[j].to_string();
            }
            Err(e) => return Err(self.failed(e)),
        }
        match self.attempt(what, &mut call).await? {
            Ok(v) => Ok(v),
            Err(s) => Err(self.failed(explain_status(&self.to.address, s))),
        }
    }

    /// One try of `call` at the current controller: Ok(Err) when it
    /// answered with an error.
    async fn attempt<T>(
        &mut self,
        what: &'static str,
        call: &mut impl AsyncFnMut(&mut AdminClient) -> Result<tonic::Response<T>, tonic::Status>,
    ) -> anyhow::Result<Result<T, tonic::Status>> {
        match tokio::time::timeout_at(self.to.deadline.at, call(&mut self.client)).await {
            Ok(r) => Ok(r.map(tonic::Response::into_inner)),
            Err(_) => Err(self.failed(ReachError::NoAnswer {
                address: self.to.address.clone(),
                within: self.to.deadline.budget,
                stage: Stage::Reply(what),
            })),
        }
    }

    /// `last`, after what the controllers tried before said.
    fn failed(&self, last: ReachError) -> anyhow::Error {
        if self.tried.is_empty() {
            return last.into();
        }
        let mut all: Vec<ReachError> = self
            .tried
            .iter()
            .map(|e| ReachError::Call {
                message: e.to_string(),
                transient: e.is_transient(),
            })
            .collect();
        all.push(last);
        ReachError::Tried(all).into()
    }
}

/// Runs `work` (talking to the controller; `what` names it in an error)
/// within the controller's deadline.
pub async fn within<T>(
    to: &Controller,
    what: &'static str,
    work: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout_at(to.deadline.at, work).await {
        Ok(r) => r,
        Err(_) => Err(ReachError::NoAnswer {
            address: to.address.clone(),
            within: to.deadline.budget,
            stage: Stage::Reply(what),
        }
        .into()),
    }
}

/// The names a certificate is valid for, when `detail` (a rustls error as
/// text) says the certificate is not valid for the name asked for: `Some`
/// with the names rustls listed (`DnsName("localhost")`,
/// `IpAddress(127.0.0.1)`), or with none when it listed none; `None` for any
/// other error.
fn name_mismatch(detail: &str) -> Option<Option<Vec<String>>> {
    if detail.contains("NotValidForName") {
        return Some(None);
    }
    let (_, rest) = detail.split_once("certificate not valid for name ")?;
    if rest.contains("is not valid for any names") {
        return Some(Some(Vec::new()));
    }
    let Some((_, list)) = rest.split_once("is only valid for ") else {
        return Some(None);
    };
    // The list ends where the next error in the chain starts: no DNS name
    // or IP address contains a colon followed by a space.
    let list = list.split(": ").next().unwrap_or(list);
    let (init, last) = list.rsplit_once(" or ").unwrap_or(("", list));
    let names = init
        .split(", ")
        .chain([last])
        .filter(|item| !item.is_empty())
        .map(|item| {
            if let Some(name) = item
                .strip_prefix("DnsName(\"")
                .and_then(|n| n.strip_suffix("\")"))
            {
                name.to_owned()
            } else if let Some(ip) = item
                .strip_prefix("IpAddress(")
                .and_then(|n| n.strip_suffix(')'))
            {
                // rustls writes ::1 as 0::1; say it as people write it.
                ip.parse::<IpAddr>()
                    .map_or_else(|_| ip.to_owned(), |ip| ip.to_string())
            } else {
                item.to_owned()
            }
        })
        .collect();
    Some(Some(names))
}

/// Turns a failed call into a sentence.
pub fn explain(address: &str, status: tonic::Status) -> anyhow::Error {
    explain_status(address, status).into()
}

/// [`explain`], as a [`ReachError`].
pub fn explain_status(address: &str, status: tonic::Status) -> ReachError {
    use tonic::Code;
    let m = status.message();
    let (message, transient) = match status.code() {
        // A server that refuses the client certificate drops the connection
        // after the handshake; the first call then fails with one of these,
        // depending on timing.
        Code::Unknown | Code::Unavailable if m.contains("transport error") || m.contains("tls") => {
            (
                format!(
                    "the controller at {address} refused the TLS handshake: this client's certificate is not signed by the controller's CA"
                ),
                false,
            )
        }
        Code::Cancelled => (
            format!(
                "the controller at {address} dropped the connection on the first call: most likely it refused the TLS handshake because this client's certificate is not signed by the controller's CA"
            ),
            false,
        ),
        Code::Unavailable => (
            format!("the controller at {address} is unavailable: {m}"),
            true,
        ),
        Code::Unauthenticated | Code::PermissionDenied => {
            (format!("the controller at {address} refused: {m}"), false)
        }
        _ => (m.to_owned(), false),
    };
    ReachError::Call { message, transient }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> anyhow::Result<ClientConfig> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.toml");
        std::fs::write(&path, text).unwrap();
        ClientConfig::load(&path).map_err(|e| {
            anyhow!(
                "{}",
                format!("{e:#}").replace(&*path.to_string_lossy(), "client.toml")
            )
        })
    }

    const KEYS: &str = "ca_file = \"ca.pem\"\ncert_file = \"a.pem\"\nkey_file = \"a.key\"\n";

    #[test]
    fn controller_is_one_address_or_several() {
        let one = load(&format!("controller = \"https://10.0.0.1:7070\"\n{KEYS}")).unwrap();
        assert_eq!(one.addresses(), vec!["https://10.0.0.1:7070"]);
        let list = load(&format!(
            "controller = [\"https://10.0.0.1:7070\", \"https://ctl-b:7070\"]\n{KEYS}"
        ))
        .unwrap();
        assert_eq!(
            list.addresses(),
            vec!["https://10.0.0.1:7070", "https://ctl-b:7070"]
        );
        // Written back as a list (`gru cert issue` copies it so).
        let text = toml::to_string(&list).unwrap();
        assert!(
            text.contains("controller = [\"https://10.0.0.1:7070\", \"https://ctl-b:7070\"]"),
            "{text}"
        );
        let commas = load(&format!(
            "controller = \"https://10.0.0.1:7070, https://ctl-b:7070\"\n{KEYS}"
        ))
        .unwrap();
        assert_eq!(commas.addresses(), list.addresses());
        let text = toml::to_string(&one).unwrap();
        assert!(
            text.contains("controller = \"https://10.0.0.1:7070\""),
            "{text}"
        );
    }

    #[test]
    fn each_bad_controller_address_is_named() {
        let err = |value: &str| {
            load(&format!("controller = {value}\n{KEYS}"))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err("\"10.0.0.1:7070\""),
            "client.toml: controller: expected an https:// address like \"https://127.0.0.1:7070\", \
             got \"10.0.0.1:7070\" (did you mean \"https://10.0.0.1:7070\"?)"
        );
        assert_eq!(
            err("[\"https://10.0.0.1:7070\", \"http://10.0.0.2:7070\"]"),
            "client.toml: controller[1]: expected an https:// address like \"https://127.0.0.1:7070\", \
             got \"http://10.0.0.2:7070\""
        );
        assert_eq!(err("[]"), "client.toml: controller: at least one address");
        assert_eq!(
            err("[\"https://a:7070\", \"https://a:7070\"]"),
            "client.toml: controller[1]: an address not listed already; \"https://a:7070\" is also \
             controller[0]"
        );
        assert!(err("7070").contains("a list of controllers' addresses"));
        assert_eq!(
            parse_controllers(&["https://a:7070", "ftp://b"], None, "--controller")
                .unwrap_err()
                .to_string(),
            "--controller[1]: expected an https:// address like \"https://127.0.0.1:7070\", got \"ftp://b\""
        );
    }

    #[test]
    fn a_name_mismatch_lists_the_names_the_certificate_is_valid_for() {
        let detail = "transport error: invalid peer certificate: certificate not valid for name \"wrong.example\"; \
             certificate is only valid for DnsName(\"localhost\"), IpAddress(127.0.0.1) or IpAddress(0::1): \
             invalid peer certificate: certificate not valid for name \"wrong.example\"; certificate is only valid for …";
        assert_eq!(
            name_mismatch(detail),
            Some(Some(vec![
                "localhost".to_owned(),
                "127.0.0.1".to_owned(),
                "::1".to_owned()
            ]))
        );
        let one = "certificate not valid for name \"x\"; certificate is only valid for DnsName(\"gru.internal\")";
        assert_eq!(
            name_mismatch(one),
            Some(Some(vec!["gru.internal".to_owned()]))
        );
        let none = "certificate not valid for name \"x\"; certificate is not valid for any names (according to its subjectAltName extension)";
        assert_eq!(name_mismatch(none), Some(Some(vec![])));
        assert_eq!(
            name_mismatch("invalid peer certificate: NotValidForName"),
            Some(None)
        );
        assert_eq!(
            name_mismatch("invalid peer certificate: UnknownIssuer"),
            None
        );
    }

    #[test]
    fn each_failure_says_what_it_waited_for_or_which_check_failed() {
        let no_answer = ReachError::NoAnswer {
            address: "https://127.0.0.1:7070".to_owned(),
            within: Duration::from_secs(10),
            stage: Stage::Handshake,
        };
        assert_eq!(
            no_answer.to_string(),
            "no answer from the controller at https://127.0.0.1:7070 within 10s (TCP connected; \
             the TLS handshake never completed — is this the controller's gRPC port?)"
        );
        assert!(no_answer.is_transient());
        let wrong = ReachError::WrongName {
            address: "https://127.0.0.1:7070".to_owned(),
            server_name: "wrong.example".to_owned(),
            config: PathBuf::from("/etc/gru/client.toml"),
            valid_for: Some(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]),
        };
        assert_eq!(
            wrong.to_string(),
            "the controller at https://127.0.0.1:7070 presented a certificate that is not valid for \
             the name \"wrong.example\" (server_name in /etc/gru/client.toml); it is valid for: localhost, 127.0.0.1"
        );
        assert!(!wrong.is_transient());
    }
}
