//! The agent's TOML config, validated before anything starts. Relative paths
//! are resolved against the config file's directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub const DEFAULT_SERVER_NAME: &str = "localhost";
pub const DEFAULT_ENGINE_LISTEN: &str = "0.0.0.0:2575";
/// Time the engine gets to finish and flush when the agent is stopped.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);
/// `[aws] imds_endpoint` when not given.
pub const DEFAULT_IMDS_ENDPOINT: &str = crate::imds::DEFAULT_ENDPOINT;
/// `[aws] warm_pool_poll` when not given.
pub const DEFAULT_WARM_POOL_POLL: Duration = crate::imds::DEFAULT_WARM_POLL;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {file}")]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Parse { file: PathBuf, message: String },
    #[error("{file}: {key}: {expected}")]
    Invalid {
        file: PathBuf,
        key: String,
        expected: String,
    },
    /// Several problems, each with its key, reported together.
    #[error("{} problems:\n{}", .0.len(), .0.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
    Many(Vec<ConfigError>),
}

#[derive(Clone, Debug)]
pub struct MinionConfig {
    /// The controller's gRPC address, `https://host:port`.
    pub controller: String,
    /// The CA that signed the controller's certificate (public, not secret).
    pub ca_file: PathBuf,
    /// The name the controller's certificate was issued for.
    pub server_name: String,
    pub fleet: String,
    pub join_token_file: PathBuf,
    pub stop_grace: Duration,
    pub engine: EngineSection,
    /// `[aws] imds = true`: the minion runs on EC2. `None` for `gru dev`
    /// and the local provider, which pass `--instance-id` and have no warm
    /// pool.
    pub aws: Option<AwsSection>,
}

/// What the agent takes from EC2's instance metadata service (IMDSv2).
#[derive(Clone, Debug)]
pub struct AwsSection {
    /// Where the instance metadata service answers: the instance id comes
    /// from it when `--instance-id` is not given, and the agent joins only
    /// once its `autoscaling/target-lifecycle-state` lets it (not while the
    /// instance waits in a warm pool). Tests point it at a stub.
    pub imds_endpoint: SocketAddr,
    /// How often the lifecycle state is read again while in a warm pool.
    pub warm_pool_poll: Duration,
}

#[derive(Clone, Debug)]
pub struct EngineSection {
    pub listen: SocketAddr,
    /// The address the load balancer should use, when not the bound one
    /// (e.g. listening on 0.0.0.0).
    pub advertise: Option<SocketAddr>,
    pub downstream: SocketAddr,
    pub max_connection_age: Duration,
    pub forwarders: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    controller: Option<String>,
    ca_file: Option<PathBuf>,
    server_name: Option<String>,
    fleet: Option<String>,
    join_token_file: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    stop_grace: Option<Duration>,
    engine: Option<RawEngine>,
    aws: Option<RawAws>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAws {
    imds: Option<bool>,
    imds_endpoint: Option<String>,
    #[serde(default, with = "humantime_serde")]
    warm_pool_poll: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEngine {
    kind: Option<String>,
    listen: Option<String>,
    advertise: Option<String>,
    downstream: Option<String>,
    #[serde(default, with = "humantime_serde")]
    max_connection_age: Option<Duration>,
    forwarders: Option<usize>,
}

impl MinionConfig {
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.to_owned(),
            source,
        })?;
        Self::parse(file, &text)
    }

    pub fn parse(file: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: Raw = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let invalid = |key: &str, expected: &str| ConfigError::Invalid {
            file: file.to_owned(),
            key: key.to_owned(),
            expected: expected.to_owned(),
        };
        let base = file.parent().unwrap_or(Path::new("."));
        let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let addr = |key: &str, s: &str| -> Result<SocketAddr, ConfigError> {
            s.parse().map_err(|_| ConfigError::Invalid {
                file: file.to_owned(),
                key: key.to_owned(),
                expected: format!("an address like 127.0.0.1:2575, got {s:?}"),
            })
        };

        // Every independent problem is reported, not only the first: each
        // top-level key, the [engine] table and the [aws] table.
        let mut errors = Vec::new();
        let controller = keep(
            &mut errors,
            raw.controller
                .ok_or_else(|| {
                    invalid(
                        "controller",
                        "the controller's address, like \"https://10.0.0.2:7070\"",
                    )
                })
                .and_then(|c| {
                    if c.starts_with("https://") {
                        Ok(c)
                    } else {
                        Err(invalid(
                            "controller",
                            "an https:// address (gRPC is always TLS)",
                        ))
                    }
                }),
        );
        let ca_file = keep(
            &mut errors,
            raw.ca_file.ok_or_else(|| {
                invalid("ca_file", "the CA certificate that signed the controller's")
            }),
        )
        .map(resolve);
        let fleet = keep(
            &mut errors,
            raw.fleet
                .ok_or_else(|| invalid("fleet", "the fleet this minion joins")),
        );
        let join_token_file = keep(
            &mut errors,
            raw.join_token_file
                .ok_or_else(|| invalid("join_token_file", "the path of the join token")),
        )
        .map(resolve);
        let engine = || -> Result<EngineSection, ConfigError> {
            let e = raw
                .engine
                .ok_or_else(|| invalid("engine", "an [engine] table"))?;
            match e.kind.as_deref() {
                None | Some("reference") => {}
                Some(other) => {
                    return Err(invalid(
                        "engine.kind",
                        &format!("\"reference\", got {other:?}"),
                    ));
                }
            }
            let listen = addr(
                "engine.listen",
                e.listen.as_deref().unwrap_or(DEFAULT_ENGINE_LISTEN),
            )?;
            let advertise = e
                .advertise
                .as_deref()
                .map(|a| addr("engine.advertise", a))
                .transpose()?;
            let downstream = addr(
                "engine.downstream",
                e.downstream
                    .as_deref()
                    .ok_or_else(|| invalid("engine.downstream", "where messages go on to"))?,
            )?;
            let forwarders = e
                .forwarders
                .unwrap_or(gru_engine::engine::DEFAULT_FORWARDERS);
            if forwarders == 0 {
                return Err(invalid("engine.forwarders", "at least 1"));
            }
            Ok(EngineSection {
                listen,
                advertise,
                downstream,
                max_connection_age: e
                    .max_connection_age
                    .unwrap_or(gru_engine::engine::DEFAULT_MAX_CONNECTION_AGE),
                forwarders,
            })
        };
        let engine = keep(&mut errors, engine());
        let aws = || -> Result<Option<AwsSection>, ConfigError> {
            match raw.aws {
                None => Ok(None),
                Some(a) if a.imds != Some(true) => {
                    let stray = [
                        ("aws.imds_endpoint", a.imds_endpoint.is_some()),
                        ("aws.warm_pool_poll", a.warm_pool_poll.is_some()),
                    ];
                    if let Some((key, _)) = stray.iter().find(|(_, set)| *set) {
                        return Err(invalid(
                            key,
                            "only read with aws.imds = true (it is off or missing)",
                        ));
                    }
                    Ok(None)
                }
                Some(a) => {
                    let imds_endpoint = a.imds_endpoint.as_deref().unwrap_or(DEFAULT_IMDS_ENDPOINT);
                    let imds_endpoint = imds_endpoint.parse().map_err(|_| {
                        invalid(
                            "aws.imds_endpoint",
                            &format!(
                                "an address like {DEFAULT_IMDS_ENDPOINT}, got {imds_endpoint:?}"
                            ),
                        )
                    })?;
                    let warm_pool_poll = a.warm_pool_poll.unwrap_or(DEFAULT_WARM_POOL_POLL);
                    if warm_pool_poll.is_zero() {
                        return Err(invalid(
                            "aws.warm_pool_poll",
                            "a duration above 0s, like \"5s\"",
                        ));
                    }
                    Ok(Some(AwsSection {
                        imds_endpoint,
                        warm_pool_poll,
                    }))
                }
            }
        };
        let aws = keep(&mut errors, aws());
        match (controller, ca_file, fleet, join_token_file, engine, aws) {
            (
                Some(controller),
                Some(ca_file),
                Some(fleet),
                Some(join_token_file),
                Some(engine),
                Some(aws),
            ) if errors.is_empty() => Ok(MinionConfig {
                controller,
                ca_file,
                server_name: raw
                    .server_name
                    .unwrap_or_else(|| DEFAULT_SERVER_NAME.to_owned()),
                fleet,
                join_token_file,
                stop_grace: raw.stop_grace.unwrap_or(DEFAULT_STOP_GRACE),
                engine,
                aws,
            }),
            _ if errors.len() == 1 => Err(errors.remove(0)),
            _ => Err(ConfigError::Many(errors)),
        }
    }
}

/// The value, or None with its error kept for the report.
fn keep<T>(errors: &mut Vec<ConfigError>, r: Result<T, ConfigError>) -> Option<T> {
    r.map_err(|e| errors.push(e)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        controller = "https://127.0.0.1:7070"
        ca_file = "ca.pem"
        fleet = "local"
        join_token_file = "/run/gru/token"
        [engine]
        listen = "127.0.0.1:0"
        downstream = "127.0.0.1:2576"
        max_connection_age = "2s"
    "#;

    #[test]
    fn good_config() {
        let c = MinionConfig::parse(Path::new("/etc/gru/minion.toml"), GOOD).expect("valid");
        assert_eq!(c.ca_file, PathBuf::from("/etc/gru/ca.pem"));
        assert_eq!(c.join_token_file, PathBuf::from("/run/gru/token"));
        assert_eq!(c.engine.max_connection_age, Duration::from_secs(2));
        assert_eq!(c.server_name, DEFAULT_SERVER_NAME);
        assert!(c.aws.is_none(), "no instance metadata unless asked for");
    }

    #[test]
    fn aws_section() {
        let parse = |extra: &str| {
            MinionConfig::parse(Path::new("m.toml"), &format!("{GOOD}\n[aws]\n{extra}"))
        };
        let c = parse("imds = true").expect("valid");
        let aws = c.aws.expect("[aws] imds = true");
        assert_eq!(aws.imds_endpoint.to_string(), DEFAULT_IMDS_ENDPOINT);
        assert_eq!(aws.warm_pool_poll, DEFAULT_WARM_POOL_POLL);
        let aws =
            parse("imds = true\nimds_endpoint = \"127.0.0.1:8111\"\nwarm_pool_poll = \"250ms\"")
                .expect("valid")
                .aws
                .expect("aws");
        assert_eq!(aws.imds_endpoint.to_string(), "127.0.0.1:8111");
        assert_eq!(aws.warm_pool_poll, Duration::from_millis(250));
        assert!(parse("imds = false").expect("valid").aws.is_none());
    }

    #[test]
    fn aws_errors_name_the_key() {
        let err = |extra: &str| {
            MinionConfig::parse(Path::new("m.toml"), &format!("{GOOD}\n[aws]\n{extra}"))
                .expect_err(extra)
                .to_string()
        };
        assert_eq!(
            err("imds = true\nimds_endpoint = \"metadata\""),
            "m.toml: aws.imds_endpoint: an address like 169.254.169.254:80, got \"metadata\""
        );
        assert_eq!(
            err("imds = true\nwarm_pool_poll = \"0s\""),
            "m.toml: aws.warm_pool_poll: a duration above 0s, like \"5s\""
        );
        assert_eq!(
            err("imds_endpoint = \"127.0.0.1:80\""),
            "m.toml: aws.imds_endpoint: only read with aws.imds = true (it is off or missing)"
        );
        let e = err("imds = \"yes\"");
        assert!(e.contains("imds = \"yes\"") && e.contains("boolean"), "{e}");
        let e = err("imds = true\nimds_ttl = 5");
        assert!(e.contains("unknown field `imds_ttl`"), "{e}");
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let text = GOOD
            .replace("https://", "http://")
            .replace("\"127.0.0.1:2576\"", "\"x\"")
            .replace("fleet = \"local\"", "");
        let e = MinionConfig::parse(Path::new("m.toml"), &text).expect_err("three problems");
        let e = e.to_string();
        assert!(e.starts_with("3 problems:\n"), "{e}");
        for key in ["controller", "fleet", "engine.downstream"] {
            assert!(
                e.contains(&format!("m.toml: {key}: ")),
                "{key} missing in {e}"
            );
        }
    }

    #[test]
    fn errors_name_the_key() {
        let e = MinionConfig::parse(Path::new("m.toml"), &GOOD.replace("https://", "http://"))
            .expect_err("plaintext refused");
        assert_eq!(
            e.to_string(),
            "m.toml: controller: an https:// address (gRPC is always TLS)"
        );
        let e = MinionConfig::parse(
            Path::new("m.toml"),
            &GOOD.replace("\"127.0.0.1:2576\"", "\"x\""),
        )
        .expect_err("bad address");
        assert_eq!(
            e.to_string(),
            "m.toml: engine.downstream: an address like 127.0.0.1:2575, got \"x\""
        );
    }
}
