//! The TOML configs gru writes for its own services: `gru dev`'s controller
//! and minion configs, and the `/etc/gru/minion.toml` that
//! `gru cloud-init render` puts in user-data.
//!
//! Each is a typed struct serialized by the toml crate, so a value holding a
//! quote, a backslash or a newline stays inside its string. The keys are the
//! ones `gru_controller::ControllerConfig` and `gru_minion::MinionConfig`
//! read (deploy/*.example.toml documents them); the writers load what they
//! wrote before using it. The toml crate places no comment beside a key, so
//! a file's comments are a header ([`to_toml`]).

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Serialize, Serializer};

/// A minion config (`gru minion --config`). Durations and addresses are
/// strings: cloud-init keeps the operator's spelling (`10m`) and writes
/// CloudFormation placeholders (`0.0.0.0:${EnginePort}`) where they go.
#[derive(Serialize)]
pub struct MinionFile {
    pub controller: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    pub ca_file: String,
    pub fleet: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub join_token_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_grace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
    pub engine: MinionEngine,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aws: Option<MinionAws>,
}

/// `[engine]` of a minion config: the reference engine.
#[derive(Serialize)]
pub struct MinionEngine {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub listen: String,
    pub downstream: String,
    pub max_connection_age: String,
}

/// `[aws]` of a minion config.
#[derive(Serialize)]
pub struct MinionAws {
    pub imds: bool,
}

/// A controller config (`gru controller --config`) with local fleets.
#[derive(Serialize)]
pub struct ControllerFile {
    pub listen: SocketAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    pub join_token_file: String,
    pub state_dir: String,
    pub tls: ControllerTls,
    pub fleet: Vec<LocalFleet>,
}

/// `[tls]` of a controller config.
#[derive(Serialize)]
pub struct ControllerTls {
    pub cert: String,
    pub key: String,
    pub client_ca: String,
}

/// A `[[fleet]]` with `provider = "local"`.
#[derive(Serialize)]
pub struct LocalFleet {
    pub name: String,
    pub provider: &'static str,
    pub min: u32,
    pub max: u32,
    pub target_queue_per_minion: u32,
    #[serde(serialize_with = "humantime_string")]
    pub scale_in_stabilization: Duration,
    #[serde(serialize_with = "humantime_string")]
    pub scale_in_cooldown: Duration,
    /// `[[fleet.schedule]]` tables, passed through as the operator wrote
    /// them; the controller validates them when it loads the file.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub schedule: Vec<toml::Table>,
    pub local: LocalProvider,
    /// `[fleet.rebalance]`; left out, the controller's defaults (on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rebalance: Option<Rebalance>,
}

/// `[fleet.rebalance]` of a controller config.
#[derive(Serialize)]
pub struct Rebalance {
    pub enabled: bool,
}

/// `[fleet.local]` of a controller config.
#[derive(Serialize)]
pub struct LocalProvider {
    pub listen: SocketAddr,
    pub minion_config: String,
    #[serde(serialize_with = "humantime_string")]
    pub deregistration_delay: Duration,
    pub log_dir: String,
}

/// A duration as the configs read it: `"30s"`, `"1m 30s"`.
fn humantime_string<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*d))
}

/// `value` as TOML, after each line of `header` as a `#` comment. The
/// header is gru's own text: a value quoted in it is written with `{:?}`,
/// which keeps it on its line.
pub fn to_toml(header: &str, value: &impl Serialize) -> Result<String, toml::ser::Error> {
    let mut out = String::new();
    for line in header.lines() {
        out.push('#');
        if !line.is_empty() {
            out.push(' ');
            out.push_str(line);
        }
        out.push('\n');
    }
    out.push_str(&toml::to_string(value)?);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_comes_first_as_comments() {
        let text = to_toml("first\n\nsecond", &MinionAws { imds: true }).unwrap();
        assert_eq!(text, "# first\n#\n# second\nimds = true\n");
    }

    #[test]
    fn durations_are_humantime_strings() {
        let provider = LocalProvider {
            listen: "127.0.0.1:2575".parse().unwrap(),
            minion_config: "minion.toml".into(),
            deregistration_delay: Duration::from_secs(90),
            log_dir: "minions".into(),
        };
        let back: toml::Table = toml::from_str(&toml::to_string(&provider).unwrap()).unwrap();
        assert_eq!(back["deregistration_delay"].as_str(), Some("1m 30s"));
        assert_eq!(back["listen"].as_str(), Some("127.0.0.1:2575"));
    }
}
