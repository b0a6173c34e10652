//! How the CLI finds and reaches the controller: a small TOML client config
//! (written by `gru dev`), TLS with a client certificate, a deadline on
//! every step (TCP, the TLS handshake, the call), and errors a person can act
//! on instead of `transport error`: each says what the CLI waited for, or
//! which check of the controller's certificate failed ([`ReachError`]).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use gru_proto::v1::admin_service_client::AdminServiceClient;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

pub const CONFIG_ENV: &str = "GRU_CONFIG";
/// How long a command waits for the controller unless `--timeout` says
/// otherwise: connecting, the TLS handshake and the call together. Also the
/// bound on each step of a `--wait`, whose own timeout is longer.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the CLI finds the controller and its credentials.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
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
        // gRPC to the controller is always TLS: say so plainly rather than
        // let the URI parser or the transport fail in its own words.
        if !c.controller.starts_with("https://") {
            let hint = if c.controller.contains("://") {
                String::new()
            } else {
                format!(" (did you mean \"https://{}\"?)", c.controller)
            };
            bail!(
                "{}: controller: expected an https:// address like \"https://127.0.0.1:7070\", got {:?}{hint}",
                path.display(),
                c.controller
            );
        }
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut c.ca_file, &mut c.cert_file, &mut c.key_file] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(c)
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
        }
    }
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

/// A connection to the controller and the deadline its calls share.
pub struct Admin {
    pub client: AdminServiceClient<Channel>,
    pub to: Controller,
}

/// Where calls go and until when they may take: what [`call`] needs beside
/// the client (kept apart so a call can borrow both).
#[derive(Clone, Debug)]
pub struct Controller {
    pub address: String,
    pub deadline: Deadline,
}

/// Connects to the controller named by the client config: TCP and the TLS
/// handshake, both within `deadline`.
pub async fn connect(config: Option<&Path>, deadline: Deadline) -> anyhow::Result<Admin> {
    gru_proto::install_crypto_provider();
    let path = config_path(config);
    let c = ClientConfig::load(&path)?;
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
    // The TCP connect gets a little less than the whole budget, so that
    // when the budget runs out first, TCP had connected and the wait was
    // for the TLS handshake.
    let remaining = deadline.remaining();
    let endpoint = Channel::from_shared(c.controller.clone())
        .with_context(|| {
            format!(
                "{}: controller: not a valid address: {:?}",
                path.display(),
                c.controller
            )
        })?
        .tls_config(tls)
        .context("invalid TLS settings")?
        .connect_timeout(remaining.saturating_sub(remaining / 10));
    let channel = match tokio::time::timeout_at(deadline.at, endpoint.connect()).await {
        Ok(Ok(channel)) => channel,
        Ok(Err(e)) => {
            let detail = gru_core::error_chain(&e);
            return Err(explain_connect(&c, &path, deadline, &detail).into());
        }
        Err(_) => {
            return Err(ReachError::NoAnswer {
                address: c.controller,
                within: deadline.budget,
                stage: Stage::Handshake,
            }
            .into());
        }
    };
    Ok(Admin {
        client: AdminServiceClient::new(channel),
        to: Controller {
            address: c.controller,
            deadline,
        },
    })
}

/// Runs one call (`what` names it in an error) within the controller's
/// deadline, and turns a failure into a sentence.
pub async fn call<T>(
    to: &Controller,
    what: &'static str,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> anyhow::Result<T> {
    within(to, what, async {
        call.await
            .map(tonic::Response::into_inner)
            .map_err(|s| explain(&to.address, s))
    })
    .await
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

/// Turns a failed connect (its error chain as text: tonic's transport error
/// keeps the rustls and io errors only as sources) into a [`ReachError`].
fn explain_connect(
    c: &ClientConfig,
    config: &Path,
    deadline: Deadline,
    detail: &str,
) -> ReachError {
    let address = c.controller.clone();
    if detail.contains("Connection refused") || detail.contains("connection refused") {
        ReachError::Refused { address }
    } else if let Some(valid_for) = name_mismatch(detail) {
        ReachError::WrongName {
            address,
            server_name: c.server_name.clone(),
            config: config.to_owned(),
            valid_for,
        }
    } else if detail.contains("UnknownIssuer") {
        ReachError::UnknownCa {
            address,
            ca: c.ca_file.clone(),
            config: config.to_owned(),
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
    ReachError::Call { message, transient }.into()
}

#[cfg(test)]
mod tests {
    use super::*;

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
