//! The agent's TOML config, validated before anything starts. Relative paths
//! are resolved against the config file's directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gru_engine::routes::{AckMode, Route};
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

/// `[engine]`: which engine this minion manages, and how.
#[derive(Clone, Debug)]
pub enum EngineSection {
    /// `kind = "reference"` (the default): gru's own HL7/MLLP engine, run
    /// in this process.
    Reference(ReferenceSection),
}

impl EngineSection {
    /// The address the load balancer should use, when known from the config.
    pub fn advertise(&self) -> Option<SocketAddr> {
        match self {
            EngineSection::Reference(r) => r.advertise,
        }
    }
}

/// The reference engine's settings, passed on to `gru_engine::EngineConfig`.
#[derive(Clone, Debug)]
pub struct ReferenceSection {
    pub listen: SocketAddr,
    /// The address the load balancer should use, when not the bound one
    /// (e.g. listening on 0.0.0.0).
    pub advertise: Option<SocketAddr>,
    /// Where messages go when there are no `routes` (plain pass-through).
    /// `None` only when `routes` are given.
    pub downstream: Option<SocketAddr>,
    pub max_connection_age: Duration,
    pub forwarders: usize,
    /// When senders get their ACK.
    pub ack_mode: AckMode,
    /// The durable queue's directory; `None` = in memory only (a crash
    /// loses what was queued).
    pub queue_dir: Option<PathBuf>,
    /// Where each message goes; empty = one route to `downstream`.
    pub routes: Vec<Route>,
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
    ack_mode: Option<AckMode>,
    queue_dir: Option<PathBuf>,
    routes: Option<Vec<Route>>,
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
        let ctx = Ctx { file, base };
        let engine = match raw.engine {
            None => keep(&mut errors, Err(invalid("engine", "an [engine] table"))),
            Some(e) => engine_section(&ctx, e, &mut errors),
        };
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

/// What every check needs to word its error and resolve its paths.
struct Ctx<'a> {
    file: &'a Path,
    /// The config file's directory.
    base: &'a Path,
}

impl Ctx<'_> {
    fn invalid(&self, key: &str, expected: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_owned(),
            key: key.to_owned(),
            expected: expected.into(),
        }
    }

    fn resolve(&self, p: PathBuf) -> PathBuf {
        if p.is_absolute() {
            p
        } else {
            self.base.join(p)
        }
    }

    fn addr(&self, key: &str, s: &str) -> Result<SocketAddr, ConfigError> {
        s.parse()
            .map_err(|_| self.invalid(key, format!("an address like 127.0.0.1:2575, got {s:?}")))
    }
}

/// `[engine]`, with every problem in it kept in `errors`.
fn engine_section(ctx: &Ctx, e: RawEngine, errors: &mut Vec<ConfigError>) -> Option<EngineSection> {
    let before = errors.len();
    let section = match e.kind.as_deref() {
        None | Some("reference") => reference_section(ctx, e, errors).map(EngineSection::Reference),
        Some(other) => {
            errors.push(ctx.invalid("engine.kind", format!("\"reference\", got {other:?}")));
            None
        }
    };
    section.filter(|_| errors.len() == before)
}

fn reference_section(
    ctx: &Ctx,
    e: RawEngine,
    errors: &mut Vec<ConfigError>,
) -> Option<ReferenceSection> {
    let listen = keep(
        errors,
        ctx.addr(
            "engine.listen",
            e.listen.as_deref().unwrap_or(DEFAULT_ENGINE_LISTEN),
        ),
    );
    let advertise = keep(
        errors,
        e.advertise
            .as_deref()
            .map(|a| ctx.addr("engine.advertise", a))
            .transpose(),
    );
    let routes = e.routes.unwrap_or_default();
    let downstream = keep(
        errors,
        match (e.downstream.as_deref(), routes.is_empty()) {
            (Some(d), true) => ctx.addr("engine.downstream", d).map(Some),
            (None, true) => Err(ctx.invalid(
                "engine.downstream",
                "where messages go on to (or [[engine.routes]])",
            )),
            (Some(_), false) => Err(ctx.invalid(
                "engine.downstream",
                "not used with [[engine.routes]]: list the address in a route's destinations",
            )),
            (None, false) => Ok(None),
        },
    );
    let forwarders = e
        .forwarders
        .unwrap_or(gru_engine::engine::DEFAULT_FORWARDERS);
    if forwarders == 0 {
        errors.push(ctx.invalid("engine.forwarders", "at least 1"));
    }
    let mut names = std::collections::BTreeSet::new();
    for (i, route) in routes.iter().enumerate() {
        let key = format!("engine.routes[{i}]");
        if route.name.trim().is_empty() {
            errors.push(ctx.invalid(&format!("{key}.name"), "a name for logs, like \"adt\""));
        } else if !names.insert(route.name.as_str()) {
            errors.push(ctx.invalid(
                &format!("{key}.name"),
                format!("a name no other route has, got {:?} again", route.name),
            ));
        }
        if route.destinations.is_empty() {
            errors.push(ctx.invalid(
                &format!("{key}.destinations"),
                "at least one address, like [\"10.0.0.5:2576\"]",
            ));
        }
        if let Some(Err(err)) = route.transform.as_ref().map(|t| t.validate()) {
            errors.push(ctx.invalid(
                &format!("{key}.transform"),
                format!("a valid transform: {}", gru_core::error_chain(&err)),
            ));
        }
    }
    Some(ReferenceSection {
        listen: listen?,
        advertise: advertise?,
        downstream: downstream?,
        max_connection_age: e
            .max_connection_age
            .unwrap_or(gru_engine::engine::DEFAULT_MAX_CONNECTION_AGE),
        forwarders,
        ack_mode: e.ack_mode.unwrap_or_default(),
        queue_dir: e.queue_dir.map(|p| ctx.resolve(p)),
        routes,
    })
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
        let max_connection_age = match &c.engine {
            EngineSection::Reference(r) => r.max_connection_age,
        };
        assert_eq!(max_connection_age, Duration::from_secs(2));
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

    fn reference(c: MinionConfig) -> ReferenceSection {
        match c.engine {
            EngineSection::Reference(r) => r,
        }
    }

    fn dests(n: u16) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([10, 0, 2, 10 + i as u8], 2576)))
            .collect()
    }

    /// The shipped examples parse, and carry the benchmark's topologies.
    #[test]
    fn shipped_examples_parse() {
        let file = Path::new("/etc/gru/minion.toml");
        let plain = reference(
            MinionConfig::parse(file, include_str!("../../../deploy/minion.example.toml"))
                .expect("minion.example.toml"),
        );
        assert!(plain.routes.is_empty());
        assert_eq!(plain.downstream, Some("127.0.0.1:2576".parse().unwrap()));
        assert_eq!(plain.ack_mode, AckMode::AfterDelivery);

        let t2 = reference(
            MinionConfig::parse(file, include_str!("../../../deploy/minion.t2.example.toml"))
                .expect("minion.t2.example.toml"),
        );
        let d = dests(5);
        assert_eq!(t2.routes, gru_engine::routes::t2_routes([d[0], d[1]]));
        assert_eq!(t2.downstream, None);
        assert_eq!(t2.ack_mode, AckMode::AfterEnqueue);
        assert_eq!(t2.queue_dir, Some(PathBuf::from("/var/lib/gru/queue")));

        let t4 = reference(
            MinionConfig::parse(file, include_str!("../../../deploy/minion.t4.example.toml"))
                .expect("minion.t4.example.toml"),
        );
        assert_eq!(
            t4.routes,
            gru_engine::routes::t4_routes([d[0], d[1], d[2], d[3], d[4]])
        );
        assert_eq!(t4.ack_mode, AckMode::AfterEnqueue);
    }

    #[test]
    fn reference_engine_settings() {
        let text = GOOD.replace("downstream = \"127.0.0.1:2576\"", "")
            + r#"ack_mode = "none"
            queue_dir = "queue"
            [[engine.routes]]
            name = "adt"
            destinations = ["127.0.0.1:2576"]
            transform = [{ op = "set", path = "MSH-4", value = "GRU" }]
            [[engine.routes]]
            name = "copy"
            destinations = ["127.0.0.1:2577", "127.0.0.1:2578"]"#;
        let r = reference(MinionConfig::parse(Path::new("/etc/gru/m.toml"), &text).expect("valid"));
        assert_eq!(r.ack_mode, AckMode::None);
        assert_eq!(
            r.queue_dir,
            Some(PathBuf::from("/etc/gru/queue")),
            "resolved against the config's directory"
        );
        assert_eq!(r.routes.len(), 2);
        assert_eq!(r.routes[1].destinations.len(), 2);
        assert_eq!(r.downstream, None);
    }

    #[test]
    fn route_errors_name_the_key() {
        let with_routes = |routes: &str| {
            let text = GOOD.replace("downstream = \"127.0.0.1:2576\"", "") + routes;
            MinionConfig::parse(Path::new("m.toml"), &text)
                .expect_err(routes)
                .to_string()
        };
        let e = with_routes(
            r#"[[engine.routes]]
            name = "adt"
            destinations = []
            transform = [{ op = "set", path = "MSH-2", value = "x" }]
            [[engine.routes]]
            name = "adt"
            destinations = ["127.0.0.1:1"]"#,
        );
        assert_eq!(
            e,
            "3 problems:\n  \
             m.toml: engine.routes[0].destinations: at least one address, like [\"10.0.0.5:2576\"]\n  \
             m.toml: engine.routes[0].transform: a valid transform: step on MSH-2 would change the message separators\n  \
             m.toml: engine.routes[1].name: a name no other route has, got \"adt\" again"
        );
        let e = with_routes(
            r#"downstream = "127.0.0.1:2576"
            [[engine.routes]]
            name = "adt"
            destinations = ["127.0.0.1:1"]"#,
        );
        assert_eq!(
            e,
            "m.toml: engine.downstream: not used with [[engine.routes]]: list the address in a route's destinations"
        );
        assert_eq!(
            with_routes(""),
            "m.toml: engine.downstream: where messages go on to (or [[engine.routes]])"
        );
        let e = with_routes("ack_mode = \"later\"");
        assert!(
            e.contains("m.toml") && e.contains("later") && e.contains("after-enqueue"),
            "{e}"
        );
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
