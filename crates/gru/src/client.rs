//! How the CLI finds and reaches the controller: a small TOML client config
//! (written by `gru dev`), TLS with a client certificate, and errors a person
//! can act on instead of `transport error`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use gru_proto::v1::admin_service_client::AdminServiceClient;
use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

pub const CONFIG_ENV: &str = "GRU_CONFIG";
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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

pub struct Admin {
    pub client: AdminServiceClient<Channel>,
    pub address: String,
}

/// Connects to the controller named by the client config.
pub async fn connect(config: Option<&Path>) -> anyhow::Result<Admin> {
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
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(Duration::from_secs(30));
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| explain_connect(&c.controller, &c.ca_file, &e))?;
    Ok(Admin {
        client: AdminServiceClient::new(channel),
        address: c.controller,
    })
}

fn explain_connect(address: &str, ca: &Path, e: &tonic::transport::Error) -> anyhow::Error {
    let detail = gru_core::error_chain(e);
    if detail.contains("Connection refused") || detail.contains("connection refused") {
        anyhow!(
            "cannot reach the controller at {address}: connection refused (is `gru dev` or `gru controller` running?)"
        )
    } else if detail.contains("certificate") || detail.contains("UnknownIssuer") {
        anyhow!(
            "the controller at {address} presented a certificate not signed by the CA in {} ({detail})",
            ca.display()
        )
    } else if detail.contains("timed out") || detail.contains("elapsed") {
        anyhow!(
            "cannot reach the controller at {address}: timed out after {}s",
            CONNECT_TIMEOUT.as_secs()
        )
    } else {
        anyhow!("cannot reach the controller at {address}: {detail}")
    }
}

/// Turns a failed call into a sentence.
pub fn explain(address: &str, status: tonic::Status) -> anyhow::Error {
    use tonic::Code;
    let m = status.message();
    match status.code() {
        // A server that refuses the client certificate drops the connection
        // after the handshake; the first call then fails with one of these,
        // depending on timing.
        Code::Unknown | Code::Unavailable if m.contains("transport error") || m.contains("tls") => {
            anyhow!(
                "the controller at {address} refused the TLS handshake: this client's certificate is not signed by the controller's CA"
            )
        }
        Code::Cancelled => anyhow!(
            "the controller at {address} dropped the connection on the first call: most likely it refused the TLS handshake because this client's certificate is not signed by the controller's CA"
        ),
        Code::Unavailable => anyhow!("the controller at {address} is unavailable: {m}"),
        Code::Unauthenticated => anyhow!("the controller at {address} refused: {m}"),
        _ => anyhow!("{m}"),
    }
}
