//! `gru cert issue`: an admin certificate from the controller's CA, with a
//! client config that uses it, for operators without their own PKI.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use gru_controller::access::Role;
use gru_controller::pki::{self, Ca};

use crate::client::{self, ClientConfig};

#[derive(Subcommand)]
pub enum CertCommand {
    /// Issue an admin certificate from the controller's CA: writes NAME.pem,
    /// NAME.key, ca.pem and a client.toml that `gru --config DIR/client.toml`
    /// (or GRU_CONFIG) uses as it is.
    Issue(IssueArgs),
}

#[derive(Args)]
pub struct IssueArgs {
    /// Who the certificate is for; its common name (CN), which the event
    /// log names as the author of every change made with it.
    #[arg(long)]
    name: String,
    /// What it may do: viewer (list, explain, events), operator (+ scale,
    /// drain, pause, resume) or admin (+ trust). Written as the
    /// certificate's OU, gru-ROLE, which the controller's default [access]
    /// rules map to the role.
    #[arg(long, value_parser = parse_role)]
    role: Role,
    /// The directory to write into (made if missing; files in it with the
    /// same names are replaced).
    #[arg(long)]
    out: PathBuf,
    /// The CA certificate. Default: the one `gru dev` made.
    #[arg(long)]
    ca_cert: Option<PathBuf>,
    /// The CA's private key. Default: the one `gru dev` made.
    #[arg(long)]
    ca_key: Option<PathBuf>,
    /// The controller's address for client.toml. Default: the address in
    /// the current client config (--config, GRU_CONFIG, or gru dev's).
    #[arg(long)]
    controller: Option<String>,
    /// The name the controller's certificate is checked against.
    #[arg(long, default_value = pki::SERVER_NAME)]
    server_name: String,
    /// How long the certificate is valid, e.g. 30d or 12h.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "90d")]
    valid_for: Duration,
    /// The client config to take the controller's address from.
    #[arg(long)]
    config: Option<PathBuf>,
}

fn parse_role(s: &str) -> Result<Role, String> {
    Role::parse(s).ok_or_else(|| format!("expected viewer, operator or admin, got {s:?}"))
}

pub fn run(command: CertCommand) -> anyhow::Result<()> {
    match command {
        CertCommand::Issue(a) => issue(a),
    }
}

fn issue(a: IssueArgs) -> anyhow::Result<()> {
    if a.name.trim().is_empty() || a.name.contains(['/', '\\']) || a.name.starts_with('.') {
        bail!(
            "--name: expected a name usable as a file name (no '/', not starting with '.'), got {:?}",
            a.name
        );
    }
    if a.valid_for.is_zero() {
        bail!("--valid-for: expected a positive duration");
    }
    let dev = client::default_state_dir();
    let ca_cert = a.ca_cert.unwrap_or_else(|| dev.join("ca.pem"));
    let ca_key = a.ca_key.unwrap_or_else(|| dev.join("ca.key"));
    let controller = match a.controller {
        Some(c) => c,
        None => {
            let path = client::config_path(a.config.as_deref());
            ClientConfig::load(&path)
                .with_context(|| "--controller not given, and the controller's address could not be read from a client config")?
                .controller
        }
    };
    let ca = Ca::load(&ca_cert, &ca_key)?;
    let issued = ca.issue_admin(&a.name, a.role, a.valid_for)?;
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let file = |ext: &str| a.out.join(format!("{}.{ext}", a.name));
    pki::write_file(&file("pem"), &issued.cert_pem, false)?;
    pki::write_file(&file("key"), &issued.key_pem, true)?;
    pki::write_file(&a.out.join("ca.pem"), ca.cert_pem(), false)?;
    let config = ClientConfig {
        controller,
        ca_file: "ca.pem".into(),
        cert_file: format!("{}.pem", a.name).into(),
        key_file: format!("{}.key", a.name).into(),
        server_name: a.server_name,
    };
    let client_toml = a.out.join("client.toml");
    pki::write_file(&client_toml, &toml::to_string(&config)?, false)?;
    // Check what was written loads as the CLI will load it.
    ClientConfig::load(&client_toml)?;
    println!(
        "issued CN={} (role {}, valid until {}) into {}\nuse it with: gru whoami --config {}",
        a.name,
        a.role,
        issued.not_after,
        a.out.display(),
        client_toml.display()
    );
    Ok(())
}
