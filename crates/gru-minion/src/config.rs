//! The agent's TOML config, validated before anything starts. Relative paths
//! are resolved against the config file's directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::collections::BTreeMap;

use gru_engine::routes::{AckMode, Route};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{HeaderMap, Method, StatusCode, Uri};
use serde::Deserialize;

pub use crate::engine::http::JsonPointer;

pub const DEFAULT_SERVER_NAME: &str = "localhost";
pub const DEFAULT_ENGINE_LISTEN: &str = "0.0.0.0:2575";
/// Time the engine gets to finish and flush when the agent is stopped.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);
/// `[aws] imds_endpoint` when not given.
pub const DEFAULT_IMDS_ENDPOINT: &str = crate::imds::DEFAULT_ENDPOINT;
/// `[aws] warm_pool_poll` when not given.
pub const DEFAULT_WARM_POOL_POLL: Duration = crate::imds::DEFAULT_WARM_POLL;
/// `engine.poll_interval` (http and exec adapters) when not given.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// `engine.timeout` (http and exec adapters) when not given.
pub const DEFAULT_ADAPTER_TIMEOUT: Duration = Duration::from_secs(5);
/// Where the number of connections to close goes in an adapter's `shed`
/// call (an argument of the exec command; the URL or body of the request).
pub const COUNT_PLACEHOLDER: &str = "{count}";

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
    /// The controllers' gRPC addresses: one, or several when controllers
    /// run active/passive and the agent follows whichever leads.
    pub controller: Controllers,
    /// The CA that signed the controller's certificate (public, not secret).
    pub ca_file: PathBuf,
    /// The name the controller's certificate was issued for.
    pub server_name: String,
    pub fleet: String,
    /// The join token's file; `None` with `[aws]`: the agent joins with the
    /// instance's signed identity document instead.
    pub join_token_file: Option<PathBuf>,
    pub stop_grace: Duration,
    /// Where the agent keeps its key and certificate (owner-only) across
    /// restarts; `None`: in memory only, and a restarted agent joins again
    /// from scratch (with the token; on AWS its identity document is
    /// accepted only once, so set it there).
    pub state_dir: Option<PathBuf>,
    /// Where the agent serves Prometheus metrics (`/metrics`, `/healthz`);
    /// off when `None`, the default.
    pub metrics_listen: Option<SocketAddr>,
    pub engine: EngineSection,
    /// `[aws] imds = true`: the minion runs on EC2. `None` for `gru dev`
    /// and the local provider, which pass `--instance-id` and have no warm
    /// pool.
    pub aws: Option<AwsSection>,
}

/// The controllers an agent (or the CLI, which reads its `controller` into
/// this type too) may talk to, in the order configured. When several
/// controllers share one store, one of them leads and the others answer
/// with the leader's address (DESIGN.md, High availability); a host name
/// that resolves to several addresses stands for each of them, which only
/// a connection attempt finds out (see [`crate::agent::resolve`]).
///
/// Never empty; no address twice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Controllers(Vec<ControllerAddress>);

impl Controllers {
    /// The addresses as written, each paired with the key that names it in
    /// an error (`controller` for a single address, `controller[i]` for one
    /// of a list). Err: the key and what was expected there.
    pub fn parse<'a>(
        items: impl IntoIterator<Item = (String, &'a str)>,
    ) -> Result<Controllers, (String, String)> {
        let mut list: Vec<(String, ControllerAddress)> = Vec::new();
        for (key, text) in items {
            let address = ControllerAddress::parse(text).map_err(|e| (key.clone(), e))?;
            if let Some((first, _)) = list.iter().find(|(_, a)| *a == address) {
                return Err((
                    key,
                    format!("an address not listed already; {text:?} is also {first}"),
                ));
            }
            list.push((key, address));
        }
        if list.is_empty() {
            return Err(("controller".to_owned(), "at least one address".to_owned()));
        }
        Ok(Controllers(list.into_iter().map(|(_, a)| a).collect()))
    }

    pub fn addresses(&self) -> &[ControllerAddress] {
        &self.0
    }
}

/// As an operator wrote them: `https://a:7070, https://b:7070`.
impl std::fmt::Display for Controllers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, a) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(a.url())?;
        }
        Ok(())
    }
}

/// True for a single address written as `other`, so code that knew one
/// controller can still compare.
impl PartialEq<String> for Controllers {
    fn eq(&self, other: &String) -> bool {
        matches!(self.0.as_slice(), [one] if one.url() == other.as_str())
    }
}

/// One controller's gRPC address: `https://host:port` (port 443 when none
/// is written).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControllerAddress {
    /// As written, without a trailing `/`.
    url: String,
    /// Without an IPv6 address's brackets, ready for a resolver.
    host: String,
    port: u16,
}

impl ControllerAddress {
    /// Err: what was expected instead.
    pub fn parse(text: &str) -> Result<ControllerAddress, String> {
        let like = || format!("an address like \"https://10.0.0.2:7070\", got {text:?}");
        if !text.starts_with("https://") {
            return Err("an https:// address (gRPC is always TLS)".to_owned());
        }
        let uri: Uri = text.parse().map_err(|_| like())?;
        let authority = uri.authority().ok_or_else(like)?;
        let path_is_empty = matches!(uri.path(), "" | "/") && uri.query().is_none();
        let host = authority.host();
        if !path_is_empty || host.is_empty() || authority.as_str().contains('@') {
            return Err(like());
        }
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        Ok(ControllerAddress {
            url: text.trim_end_matches('/').to_owned(),
            host: host.to_owned(),
            port: authority.port_u16().unwrap_or(443),
        })
    }

    /// `https://host:port` as written.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl std::fmt::Display for ControllerAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
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
// Built once per process: boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum EngineSection {
    /// `kind = "reference"` (the default): gru's own HL7/MLLP engine, run
    /// in this process.
    Reference(ReferenceSection),
    /// `kind = "http"`: an engine gru does not ship, watched and driven
    /// over its HTTP API.
    Http(AdapterSection<HttpSection>),
    /// `kind = "exec"`: an engine gru does not ship, watched and driven by
    /// running commands.
    Exec(AdapterSection<ExecSection>),
}

impl EngineSection {
    /// The address the load balancer should use, when known from the config.
    pub fn advertise(&self) -> Option<SocketAddr> {
        match self {
            EngineSection::Reference(r) => r.advertise,
            EngineSection::Http(a) => Some(a.advertise),
            EngineSection::Exec(a) => Some(a.advertise),
        }
    }
}

/// What both adapters (`kind = "http"`, `kind = "exec"`) need besides their
/// own table.
#[derive(Clone, Debug)]
pub struct AdapterSection<T> {
    /// The engine's MLLP address, as the load balancer reaches it. Required:
    /// the engine runs outside the agent, which cannot know where it listens.
    pub advertise: SocketAddr,
    /// How often queue depth and health are read.
    pub poll_interval: Duration,
    /// Limit on every outbound call (HTTP request or command).
    pub timeout: Duration,
    /// `[engine.http]` or `[engine.exec]`.
    pub adapter: T,
}

/// `[engine.http]`: how to read and drive an engine over HTTP.
#[derive(Clone, Debug)]
pub struct HttpSection {
    /// Basic auth user; its password is read from `password_file` when the
    /// engine starts, so no secret sits in the config.
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    /// The CA (PEM) to trust for https instead of the system's roots, e.g.
    /// for an engine's self-signed certificate.
    pub ca_file: Option<PathBuf>,
    /// Sent with every call (e.g. `X-Requested-With`, which Mirth requires).
    pub headers: HeaderMap,
    pub queue_depth: QueueDepthCall,
    /// `None`: healthy whenever the queue depth reads.
    pub health: Option<HealthCall>,
    /// Made in order on drain: they stop intake.
    pub drain: Vec<HttpCall>,
    /// Made in order once drained (queue depth 0), e.g. stopping channels.
    pub after_drained: Vec<HttpCall>,
    /// Made in order on resume: they undo `drain` and `after_drained`.
    pub resume: Vec<HttpCall>,
    /// Open inbound connections, read like the queue depth; with `shed`,
    /// the minion takes part in rebalancing.
    pub connections: Option<QueueDepthCall>,
    /// Asks the engine to close some connections at message boundaries.
    pub shed: Option<ShedCall>,
}

/// `engine.http.shed`: a request with [`COUNT_PLACEHOLDER`] in its URL or
/// body, checked to make a valid request whatever the count.
#[derive(Clone, Debug)]
pub struct ShedCall {
    pub method: Method,
    /// With the placeholder (a `Uri` cannot hold `{`).
    pub url: String,
    pub headers: HeaderMap,
    pub body: Option<String>,
}

impl ShedCall {
    /// The request asking for `count` connections.
    pub fn with_count(&self, count: u64) -> HttpCall {
        let n = count.to_string();
        HttpCall {
            method: self.method.clone(),
            url: self
                .url
                .replace(COUNT_PLACEHOLDER, &n)
                .parse()
                // Checked with a number in place of the placeholder when
                // the config was read.
                .expect("a shed URL with a number in it parses"),
            headers: self.headers.clone(),
            body: self.body.as_ref().map(|b| b.replace(COUNT_PLACEHOLDER, &n)),
        }
    }
}

/// One HTTP request the adapter makes.
#[derive(Clone, Debug)]
pub struct HttpCall {
    pub method: Method,
    pub url: Uri,
    /// Added to (and overriding) the adapter's headers.
    pub headers: HeaderMap,
    pub body: Option<String>,
}

/// `engine.http.queue_depth`: a GET and how to read a number from it.
#[derive(Clone, Debug)]
pub struct QueueDepthCall {
    pub call: HttpCall,
    pub read: DepthReader,
}

/// How the queue depth is read from an answer.
#[derive(Clone, Debug, PartialEq)]
pub enum DepthReader {
    /// A JSON document: the number (or numeric string) at a pointer, summed
    /// over `*` segments.
    Json(JsonPointer),
    /// A Prometheus text page: the sum of every sample of `metric` whose
    /// labels include `labels`.
    Prometheus {
        metric: String,
        labels: BTreeMap<String, String>,
    },
}

/// `engine.http.health`: a GET whose status says whether the engine is well.
#[derive(Clone, Debug)]
pub struct HealthCall {
    pub call: HttpCall,
    /// `None`: any 2xx.
    pub expect_status: Option<StatusCode>,
}

/// `[engine.exec]`: commands (no shell) that read and drive the engine.
#[derive(Clone, Debug)]
pub struct ExecSection {
    /// Prints the queue depth, a non-negative integer.
    pub queue_depth: Argv,
    /// Exit 0 = healthy; `None`: healthy whenever the queue depth reads.
    pub health: Option<Argv>,
    /// Stops intake.
    pub drain: Argv,
    /// Exit 0 = drained; `None`: drained once the queue depth reads 0.
    pub drained: Option<Argv>,
    /// Takes work again.
    pub resume: Argv,
    /// Prints the open inbound connections; with `shed`, the minion takes
    /// part in rebalancing.
    pub connections: Option<Argv>,
    /// Closes some connections at message boundaries; [`COUNT_PLACEHOLDER`]
    /// in an argument is replaced by how many.
    pub shed: Option<Argv>,
}

impl Argv {
    /// This command line with [`COUNT_PLACEHOLDER`] replaced by `count`.
    pub fn with_count(&self, count: u64) -> Argv {
        let n = count.to_string();
        Argv {
            program: self.program.clone(),
            args: self
                .args
                .iter()
                .map(|a| a.replace(COUNT_PLACEHOLDER, &n))
                .collect(),
        }
    }
}

/// A command line, run without a shell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Argv {
    /// Resolved against the config's directory when relative with a `/`;
    /// a bare name is looked up in `PATH`.
    pub program: PathBuf,
    pub args: Vec<String>,
}

impl std::fmt::Display for Argv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.program.display())?;
        for a in &self.args {
            write!(f, " {a}")?;
        }
        Ok(())
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
    /// One address or a list: read as a value to say which it got.
    controller: Option<toml::Value>,
    ca_file: Option<PathBuf>,
    server_name: Option<String>,
    fleet: Option<String>,
    join_token_file: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    stop_grace: Option<Duration>,
    state_dir: Option<PathBuf>,
    metrics_listen: Option<String>,
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
    #[serde(default, with = "humantime_serde")]
    poll_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    http: Option<RawHttp>,
    exec: Option<RawExec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    username: Option<String>,
    password_file: Option<PathBuf>,
    /// Refused with a pointer to `password_file`.
    password: Option<toml::Value>,
    ca_file: Option<PathBuf>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    queue_depth: Option<RawDepth>,
    health: Option<RawHealth>,
    #[serde(default)]
    drain: Vec<RawCall>,
    #[serde(default)]
    after_drained: Vec<RawCall>,
    #[serde(default)]
    resume: Vec<RawCall>,
    connections: Option<RawDepth>,
    shed: Option<RawCall>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDepth {
    url: String,
    json_pointer: Option<String>,
    prometheus_metric: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    url: String,
    expect_status: Option<u16>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCall {
    method: Option<String>,
    url: String,
    body: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExec {
    queue_depth: Option<Vec<String>>,
    health: Option<Vec<String>>,
    drain: Option<Vec<String>>,
    drained: Option<Vec<String>>,
    resume: Option<Vec<String>>,
    connections: Option<Vec<String>>,
    shed: Option<Vec<String>>,
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
        let ctx = Ctx { file, base };
        let controller = keep(&mut errors, controllers(&ctx, raw.controller));
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
        let join_token_file = raw.join_token_file.map(resolve);
        let state_dir = raw.state_dir.map(resolve);
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
        let metrics_listen = match raw.metrics_listen.as_deref() {
            None => Some(None),
            Some(a) => keep(
                &mut errors,
                a.parse().map(Some).map_err(|_| {
                    invalid(
                        "metrics_listen",
                        &format!("an address like 0.0.0.0:9465, got {a:?}"),
                    )
                }),
            ),
        };
        if join_token_file.is_none() && matches!(aws, Some(None)) {
            errors.push(invalid(
                "join_token_file",
                "the path of the join token (only minions with [aws] imds = true join without one, with their instance identity document)",
            ));
        }
        match (controller, ca_file, fleet, engine, aws, metrics_listen) {
            (
                Some(controller),
                Some(ca_file),
                Some(fleet),
                Some(engine),
                Some(aws),
                Some(metrics_listen),
            ) if errors.is_empty() => Ok(MinionConfig {
                controller,
                ca_file,
                server_name: raw
                    .server_name
                    .unwrap_or_else(|| DEFAULT_SERVER_NAME.to_owned()),
                fleet,
                join_token_file,
                state_dir,
                stop_grace: raw.stop_grace.unwrap_or(DEFAULT_STOP_GRACE),
                metrics_listen,
                engine,
                aws,
            }),
            _ if errors.len() == 1 => Err(errors.remove(0)),
            _ => Err(ConfigError::Many(errors)),
        }
    }
}

impl MinionConfig {
    /// What `--check-config` adds to reading `file`: the files the agent
    /// will read can be read, the engine's queue directory can be made, and
    /// the engine and the metrics listener do not want one address. Starts
    /// and creates nothing. Every problem is reported, each with its key.
    ///
    /// A join token not there yet is a note, not a problem: on EC2 it may
    /// be provisioned after boot, and the agent (restarted by systemd) joins
    /// once it is.
    pub fn check_environment(&self, file: &Path) -> Result<Vec<String>, ConfigError> {
        use gru_proto::preflight;
        let invalid = |key: &str, expected: String| ConfigError::Invalid {
            file: file.to_owned(),
            key: key.to_owned(),
            expected,
        };
        let mut errors = Vec::new();
        let mut read = |key: &str, path: &Path, what: &str| {
            if let Err(why) = preflight::readable(path) {
                errors.push(invalid(key, format!("{what}; {why}")));
            }
        };
        read(
            "ca_file",
            &self.ca_file,
            "the CA that signed the controller's certificate (PEM)",
        );
        let mut notes = Vec::new();
        if let Some(Err(why)) = self.join_token_file.as_deref().map(preflight::readable) {
            notes.push(format!(
                "{}: join_token_file: {why}; the agent cannot join until it is there",
                file.display()
            ));
        }
        let engine_listen = match &self.engine {
            EngineSection::Reference(r) => {
                if let Some(dir) = &r.queue_dir
                    && let Err(why) = preflight::directory(dir)
                {
                    errors.push(invalid("engine.queue_dir", format!("a directory; {why}")));
                }
                Some(r.listen)
            }
            EngineSection::Http(h) => {
                if let Some(p) = &h.adapter.password_file {
                    read("engine.http.password_file", p, "the engine API's password");
                }
                if let Some(p) = &h.adapter.ca_file {
                    read("engine.http.ca_file", p, "the engine API's CA (PEM)");
                }
                None
            }
            EngineSection::Exec(_) => None,
        };
        if let (Some(engine), Some(metrics)) = (engine_listen, self.metrics_listen)
            && preflight::clash(engine, metrics)
        {
            errors.push(invalid(
                "metrics_listen",
                format!("an address of its own; {metrics} is also engine.listen's"),
            ));
        }
        match errors.len() {
            0 => Ok(notes),
            1 => Err(errors.remove(0)),
            _ => Err(ConfigError::Many(errors)),
        }
    }
}

/// `controller`: one address, or a list of them.
fn controllers(ctx: &Ctx, raw: Option<toml::Value>) -> Result<Controllers, ConfigError> {
    let items = match raw {
        None => {
            return Err(ctx.invalid(
                "controller",
                "the controller's address, like \"https://10.0.0.2:7070\", or a list of the controllers' addresses",
            ));
        }
        Some(toml::Value::String(s)) => vec![("controller".to_owned(), s)],
        Some(toml::Value::Array(list)) => list
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                toml::Value::String(s) => Ok((format!("controller[{i}]"), s)),
                other => Err(ctx.invalid(
                    &format!("controller[{i}]"),
                    format!(
                        "an address like \"https://10.0.0.2:7070\", got {}",
                        other.type_str()
                    ),
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(ctx.invalid(
                "controller",
                format!(
                    "an address like \"https://10.0.0.2:7070\" or a list of addresses, got {}",
                    other.type_str()
                ),
            ));
        }
    };
    Controllers::parse(items.iter().map(|(k, v)| (k.clone(), v.as_str())))
        .map_err(|(key, expected)| ctx.invalid(&key, expected))
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
    let kind = e.kind.clone();
    let kind = kind.as_deref().unwrap_or("reference");
    // Keys of the other kinds are refused, not ignored: a reference-engine
    // key under `kind = "http"` is a mistake whichever one was meant.
    let stray: &[(&str, bool, &str)] = &[
        ("engine.listen", e.listen.is_some(), "reference"),
        ("engine.downstream", e.downstream.is_some(), "reference"),
        (
            "engine.max_connection_age",
            e.max_connection_age.is_some(),
            "reference",
        ),
        ("engine.forwarders", e.forwarders.is_some(), "reference"),
        ("engine.ack_mode", e.ack_mode.is_some(), "reference"),
        ("engine.queue_dir", e.queue_dir.is_some(), "reference"),
        ("engine.routes", e.routes.is_some(), "reference"),
        (
            "engine.poll_interval",
            e.poll_interval.is_some(),
            "http|exec",
        ),
        ("engine.timeout", e.timeout.is_some(), "http|exec"),
        ("engine.http", e.http.is_some(), "http"),
        ("engine.exec", e.exec.is_some(), "exec"),
    ];
    if ["reference", "http", "exec"].contains(&kind) {
        for (key, set, kinds) in stray {
            if *set && !kinds.split('|').any(|k| k == kind) {
                let kinds: Vec<String> =
                    kinds.split('|').map(|k| format!("kind = {k:?}")).collect();
                errors.push(ctx.invalid(
                    key,
                    format!(
                        "only read with {} (this is kind = {kind:?})",
                        kinds.join(" or ")
                    ),
                ));
            }
        }
    }
    let mut e = e;
    let (http, exec) = (e.http.take(), e.exec.take());
    let section = match kind {
        "reference" => reference_section(ctx, e, errors).map(EngineSection::Reference),
        "http" => adapter_section(ctx, &e, errors, |errors| match http {
            Some(h) => http_section(ctx, h, errors),
            None => {
                errors.push(ctx.invalid("engine.http", "an [engine.http] table (kind = \"http\")"));
                None
            }
        })
        .map(EngineSection::Http),
        "exec" => adapter_section(ctx, &e, errors, |errors| match exec {
            Some(x) => exec_section(ctx, x, errors),
            None => {
                errors.push(ctx.invalid("engine.exec", "an [engine.exec] table (kind = \"exec\")"));
                None
            }
        })
        .map(EngineSection::Exec),
        other => {
            errors.push(ctx.invalid(
                "engine.kind",
                format!("\"reference\", \"http\" or \"exec\", got {other:?}"),
            ));
            None
        }
    };
    section.filter(|_| errors.len() == before)
}

/// The keys both adapters share, around their own table's `adapter`.
fn adapter_section<T>(
    ctx: &Ctx,
    e: &RawEngine,
    errors: &mut Vec<ConfigError>,
    adapter: impl FnOnce(&mut Vec<ConfigError>) -> Option<T>,
) -> Option<AdapterSection<T>> {
    let advertise = keep(
        errors,
        match e.advertise.as_deref() {
            Some(a) => ctx.addr("engine.advertise", a),
            None => Err(ctx.invalid(
                "engine.advertise",
                "the engine's MLLP address for the load balancer, like \"10.0.1.23:6661\" (required for this kind)",
            )),
        },
    );
    let positive = |key: &str, d: Option<Duration>, default: Duration| {
        let d = d.unwrap_or(default);
        if d.is_zero() {
            Err(ctx.invalid(key, "a duration above 0s, like \"1s\""))
        } else {
            Ok(d)
        }
    };
    let poll_interval = keep(
        errors,
        positive(
            "engine.poll_interval",
            e.poll_interval,
            DEFAULT_POLL_INTERVAL,
        ),
    );
    let timeout = keep(
        errors,
        positive("engine.timeout", e.timeout, DEFAULT_ADAPTER_TIMEOUT),
    );
    let adapter = adapter(errors);
    Some(AdapterSection {
        advertise: advertise?,
        poll_interval: poll_interval?,
        timeout: timeout?,
        adapter: adapter?,
    })
}

fn http_section(ctx: &Ctx, h: RawHttp, errors: &mut Vec<ConfigError>) -> Option<HttpSection> {
    let before = errors.len();
    if h.password.is_some() {
        errors.push(ctx.invalid(
            "engine.http.password",
            "no password in the config: put it in a file only gru can read and set password_file",
        ));
    }
    match (&h.username, &h.password_file) {
        (Some(_), None) => errors.push(ctx.invalid(
            "engine.http.password_file",
            "the file holding the password of engine.http.username",
        )),
        (None, Some(_)) => errors.push(ctx.invalid(
            "engine.http.username",
            "the user whose password is in engine.http.password_file",
        )),
        _ => {}
    }
    let headers = headers(ctx, "engine.http.headers", &h.headers, errors);
    let queue_depth = match h.queue_depth {
        None => {
            errors.push(ctx.invalid(
                "engine.http.queue_depth",
                "{ url = \"...\", json_pointer = \"/...\" } or { url = \"...\", prometheus_metric = \"...\" }",
            ));
            None
        }
        Some(d) => number_call(ctx, "engine.http.queue_depth", d, errors),
    };
    let connections = h
        .connections
        .map(|d| number_call(ctx, "engine.http.connections", d, errors));
    let health = h.health.and_then(|r| {
        let key = "engine.http.health";
        let call = call(ctx, key, Method::GET, &r.url, None, &r.headers, errors);
        let expect_status = keep(
            errors,
            r.expect_status
                .map(|s| {
                    StatusCode::from_u16(s).map_err(|_| {
                        ctx.invalid(
                            &format!("{key}.expect_status"),
                            format!("an HTTP status like 200, got {s}"),
                        )
                    })
                })
                .transpose(),
        );
        Some(HealthCall {
            call: call?,
            expect_status: expect_status?,
        })
    });
    let shed = h.shed.map(|c| shed_call(ctx, c, errors));
    if shed.is_some() && connections.is_none() {
        errors.push(ctx.invalid(
            "engine.http.connections",
            "{ url = \"...\", json_pointer = \"/...\" } or { url = \"...\", prometheus_metric = \"...\" } with engine.http.shed: the controller asks a minion to shed from the connections it reports",
        ));
    }
    let mut calls = |name: &str, raw: Vec<RawCall>| -> Vec<HttpCall> {
        raw.into_iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let key = format!("engine.http.{name}[{i}]");
                let method = match c.method.as_deref() {
                    None => Some(Method::POST),
                    Some(m) => keep(errors, http_method(ctx, &key, m)),
                };
                let call = call(
                    ctx,
                    &key,
                    method.clone().unwrap_or(Method::POST),
                    &c.url,
                    c.body,
                    &c.headers,
                    errors,
                );
                method.and(call)
            })
            .collect()
    };
    let drain = calls("drain", h.drain);
    let after_drained = calls("after_drained", h.after_drained);
    let resume = calls("resume", h.resume);
    for (key, list) in [
        ("engine.http.drain", &drain),
        ("engine.http.resume", &resume),
    ] {
        if list.is_empty() && errors.len() == before {
            errors.push(ctx.invalid(
                key,
                "at least one call, like [{ method = \"POST\", url = \"...\" }]: without one the engine keeps taking work while it drains",
            ));
        }
    }
    if errors.len() != before {
        return None;
    }
    Some(HttpSection {
        username: h.username,
        password_file: h.password_file.map(|p| ctx.resolve(p)),
        ca_file: h.ca_file.map(|p| ctx.resolve(p)),
        headers: headers?,
        queue_depth: queue_depth?,
        health,
        drain,
        after_drained,
        resume,
        connections: connections.flatten(),
        shed: shed.flatten(),
    })
}

/// A GET that reads a number (`engine.http.queue_depth`,
/// `engine.http.connections`); problems kept in `errors`.
fn number_call(
    ctx: &Ctx,
    key: &str,
    d: RawDepth,
    errors: &mut Vec<ConfigError>,
) -> Option<QueueDepthCall> {
    let call = call(ctx, key, Method::GET, &d.url, None, &d.headers, errors);
    let read = match (d.json_pointer, d.prometheus_metric, d.labels) {
        (Some(_), Some(_), _) => {
            Err(ctx.invalid(key, "either json_pointer or prometheus_metric, not both"))
        }
        (None, None, _) => {
            Err(ctx.invalid(key, "json_pointer or prometheus_metric, to read the number"))
        }
        (Some(_), None, Some(_)) => {
            Err(ctx.invalid(&format!("{key}.labels"), "only read with prometheus_metric"))
        }
        (Some(p), None, None) => JsonPointer::parse(&p)
            .map(DepthReader::Json)
            .map_err(|why| ctx.invalid(&format!("{key}.json_pointer"), why)),
        (None, Some(metric), labels) => {
            if valid_metric_name(&metric) {
                Ok(DepthReader::Prometheus {
                    metric,
                    labels: labels.unwrap_or_default(),
                })
            } else {
                Err(ctx.invalid(
                    &format!("{key}.prometheus_metric"),
                    format!("a metric name like \"iris_interop_queued\", got {metric:?}"),
                ))
            }
        }
    };
    let read = keep(errors, read);
    call.zip(read)
        .map(|(call, read)| QueueDepthCall { call, read })
}

/// `engine.http.shed`, checked with a count in place of the placeholder.
fn shed_call(ctx: &Ctx, c: RawCall, errors: &mut Vec<ConfigError>) -> Option<ShedCall> {
    let key = "engine.http.shed";
    if !c.url.contains(COUNT_PLACEHOLDER)
        && !c
            .body
            .as_deref()
            .is_some_and(|b| b.contains(COUNT_PLACEHOLDER))
    {
        errors.push(ctx.invalid(
            key,
            format!("{COUNT_PLACEHOLDER} in its url or body, where the number of connections to close goes"),
        ));
        return None;
    }
    let method = match c.method.as_deref() {
        None => Some(Method::POST),
        Some(m) => keep(errors, http_method(ctx, key, m)),
    };
    let checked = call(
        ctx,
        key,
        Method::POST,
        &c.url.replace(COUNT_PLACEHOLDER, "1"),
        None,
        &c.headers,
        errors,
    )?;
    Some(ShedCall {
        method: method?,
        url: c.url,
        headers: checked.headers,
        body: c.body,
    })
}

fn http_method(ctx: &Ctx, key: &str, m: &str) -> Result<Method, ConfigError> {
    Method::from_bytes(m.to_ascii_uppercase().as_bytes()).map_err(|_| {
        ctx.invalid(
            &format!("{key}.method"),
            format!("an HTTP method like \"POST\", got {m:?}"),
        )
    })
}

/// One call's URL and headers, checked; problems kept in `errors`.
fn call(
    ctx: &Ctx,
    key: &str,
    method: Method,
    url: &str,
    body: Option<String>,
    raw_headers: &BTreeMap<String, String>,
    errors: &mut Vec<ConfigError>,
) -> Option<HttpCall> {
    let headers = headers(ctx, &format!("{key}.headers"), raw_headers, errors);
    let url = keep(
        errors,
        url.parse::<Uri>()
            .ok()
            .filter(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some())
            .ok_or_else(|| {
                ctx.invalid(
                    &format!("{key}.url"),
                    format!("an http:// or https:// URL, got {url:?}"),
                )
            }),
    );
    Some(HttpCall {
        method,
        url: url?,
        headers: headers?,
        body,
    })
}

fn headers(
    ctx: &Ctx,
    key: &str,
    raw: &BTreeMap<String, String>,
    errors: &mut Vec<ConfigError>,
) -> Option<HeaderMap> {
    let mut map = HeaderMap::new();
    let mut ok = true;
    for (name, value) in raw {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            (Ok(n), Ok(v)) => {
                map.insert(n, v);
            }
            (Err(_), _) => {
                ok = false;
                errors.push(ctx.invalid(
                    key,
                    format!("header names like \"X-Requested-With\", got {name:?}"),
                ));
            }
            (_, Err(_)) => {
                ok = false;
                errors.push(ctx.invalid(
                    &format!("{key}.{name}"),
                    "a header value of visible ASCII characters",
                ));
            }
        }
    }
    ok.then_some(map)
}

/// Prometheus metric names: `[a-zA-Z_:][a-zA-Z0-9_:]*`.
fn valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn exec_section(ctx: &Ctx, x: RawExec, errors: &mut Vec<ConfigError>) -> Option<ExecSection> {
    const EXAMPLE: &str = "a command line, like [\"/opt/engine/bin/ctl\", \"pause\"]";
    let mut argv = |name: &str, raw: Option<Vec<String>>, required: bool| -> Option<Option<Argv>> {
        let key = format!("engine.exec.{name}");
        let Some(raw) = raw else {
            if required {
                errors.push(ctx.invalid(&key, EXAMPLE));
                return None;
            }
            return Some(None);
        };
        let mut parts = raw.into_iter();
        let Some(program) = parts.next().filter(|p| !p.trim().is_empty()) else {
            errors.push(ctx.invalid(&key, format!("{EXAMPLE}, starting with the program")));
            return None;
        };
        let program = PathBuf::from(program);
        // A bare name is looked up in PATH; a relative path is relative to
        // the config file, like other paths.
        let program = if program.components().count() > 1 {
            ctx.resolve(program)
        } else {
            program
        };
        Some(Some(Argv {
            program,
            args: parts.collect(),
        }))
    };
    let queue_depth = argv("queue_depth", x.queue_depth, true);
    let health = argv("health", x.health, false);
    let drain = argv("drain", x.drain, true);
    let drained = argv("drained", x.drained, false);
    let resume = argv("resume", x.resume, true);
    let connections = argv("connections", x.connections, false);
    let shed = argv("shed", x.shed, false);
    if let Some(Some(shed)) = &shed {
        if !shed.args.iter().any(|a| a.contains(COUNT_PLACEHOLDER)) {
            errors.push(ctx.invalid(
                "engine.exec.shed",
                format!("{COUNT_PLACEHOLDER} in an argument, where the number of connections to close goes, like [\"/opt/engine/bin/ctl\", \"shed\", \"{COUNT_PLACEHOLDER}\"]"),
            ));
            return None;
        }
        if matches!(connections, Some(None)) {
            errors.push(ctx.invalid(
                "engine.exec.connections",
                "a command that prints the open inbound connections, with engine.exec.shed: the controller asks a minion to shed from the connections it reports",
            ));
            return None;
        }
    }
    Some(ExecSection {
        queue_depth: queue_depth??,
        health: health?,
        drain: drain??,
        drained: drained?,
        resume: resume??,
        connections: connections?,
        shed: shed?,
    })
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
        assert_eq!(c.join_token_file, Some(PathBuf::from("/run/gru/token")));
        let EngineSection::Reference(r) = &c.engine else {
            panic!("the reference engine is the default")
        };
        let max_connection_age = r.max_connection_age;
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
    fn only_a_minion_on_aws_joins_without_a_token() {
        let without = GOOD.replace("join_token_file = \"/run/gru/token\"", "");
        let c = MinionConfig::parse(
            Path::new("m.toml"),
            &format!("{without}\n[aws]\nimds = true"),
        )
        .expect("[aws] without a token: the identity document");
        assert_eq!(c.join_token_file, None);
        assert_eq!(
            MinionConfig::parse(Path::new("m.toml"), &without)
                .expect_err("no token, no [aws]")
                .to_string(),
            "m.toml: join_token_file: the path of the join token (only minions with [aws] imds = true join without one, with their instance identity document)"
        );
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
            other => panic!("not the reference engine: {other:?}"),
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

    const TOP: &str = r#"
        controller = "https://127.0.0.1:7070"
        ca_file = "ca.pem"
        fleet = "local"
        join_token_file = "/run/gru/token"
    "#;

    const HTTP: &str = r#"
        [engine]
        kind = "http"
        advertise = "10.0.1.23:6661"
        [engine.http]
        username = "gru"
        password_file = "secrets/mirth"
        ca_file = "mirth-ca.pem"
        headers = { "X-Requested-With" = "OpenAPI" }
        queue_depth = { url = "https://127.0.0.1:8443/api/channels/statistics", json_pointer = "/list/channelStatistics/*/queued" }
        health = { url = "https://127.0.0.1:8443/api/server/status", expect_status = 200 }
        drain = [{ url = "https://127.0.0.1:8443/api/channels/a/_pause" }]
        after_drained = [{ method = "post", url = "https://127.0.0.1:8443/api/channels/a/_stop", headers = { "X-Extra" = "1" } }]
        resume = [{ url = "https://127.0.0.1:8443/api/channels/a/_start", body = "" }]
    "#;

    fn parse_engine(engine: &str) -> Result<MinionConfig, ConfigError> {
        MinionConfig::parse(Path::new("/etc/gru/m.toml"), &format!("{TOP}{engine}"))
    }

    fn engine_err(engine: &str) -> String {
        MinionConfig::parse(Path::new("m.toml"), &format!("{TOP}{engine}"))
            .expect_err(engine)
            .to_string()
    }

    #[test]
    fn http_adapter_settings() {
        let c = parse_engine(HTTP).expect("valid");
        assert_eq!(
            c.engine.advertise(),
            Some("10.0.1.23:6661".parse().unwrap())
        );
        let EngineSection::Http(a) = c.engine else {
            panic!("kind = http")
        };
        assert_eq!(a.poll_interval, DEFAULT_POLL_INTERVAL);
        assert_eq!(a.timeout, DEFAULT_ADAPTER_TIMEOUT);
        let h = a.adapter;
        assert_eq!(
            h.password_file,
            Some(PathBuf::from("/etc/gru/secrets/mirth"))
        );
        assert_eq!(h.ca_file, Some(PathBuf::from("/etc/gru/mirth-ca.pem")));
        assert_eq!(h.headers["x-requested-with"], "OpenAPI");
        assert_eq!(
            h.queue_depth.read,
            DepthReader::Json(JsonPointer::parse("/list/channelStatistics/*/queued").unwrap())
        );
        assert_eq!(
            h.health.expect("health").expect_status,
            Some(StatusCode::OK)
        );
        assert_eq!(h.drain[0].method, Method::POST, "POST unless told");
        assert_eq!(h.after_drained[0].method, Method::POST);
        assert_eq!(h.after_drained[0].headers["x-extra"], "1");
        assert_eq!(h.resume[0].body.as_deref(), Some(""));

        let prom = HTTP.replace(
            r#"json_pointer = "/list/channelStatistics/*/queued""#,
            r#"prometheus_metric = "iris_interop_queued", labels = { production = "HIE" }"#,
        );
        let c = parse_engine(&format!("{prom}\n")).expect("valid");
        let EngineSection::Http(a) = c.engine else {
            panic!("kind = http")
        };
        assert_eq!(
            a.adapter.queue_depth.read,
            DepthReader::Prometheus {
                metric: "iris_interop_queued".to_owned(),
                labels: [("production".to_owned(), "HIE".to_owned())].into(),
            }
        );
    }

    #[test]
    fn http_adapter_errors_name_the_key() {
        assert_eq!(
            engine_err(&HTTP.replace(
                r#"json_pointer = "/list"#,
                r#"prometheus_metric = "q", json_pointer = "/list"#
            )),
            "m.toml: engine.http.queue_depth: either json_pointer or prometheus_metric, not both"
        );
        assert_eq!(
            engine_err(&HTTP.replace("username = \"gru\"", "password = \"hunter2\"")),
            "2 problems:\n  \
             m.toml: engine.http.password: no password in the config: put it in a file only gru can read and set password_file\n  \
             m.toml: engine.http.username: the user whose password is in engine.http.password_file"
        );
        let e = engine_err(
            &HTTP
                .replace(
                    "advertise = \"10.0.1.23:6661\"",
                    "downstream = \"127.0.0.1:1\"",
                )
                .replace("https://127.0.0.1:8443/api/channels/a/_pause", "ftp://x/")
                .replace("json_pointer = \"/list", "json_pointer = \"list"),
        );
        for expected in [
            "m.toml: engine.downstream: only read with kind = \"reference\" (this is kind = \"http\")",
            "m.toml: engine.advertise: the engine's MLLP address",
            "m.toml: engine.http.drain[0].url: an http:// or https:// URL, got \"ftp://x/\"",
            "m.toml: engine.http.queue_depth.json_pointer: a JSON pointer like",
        ] {
            assert!(e.contains(expected), "{expected:?} missing in {e}");
        }
        assert_eq!(
            engine_err(
                "[engine]\nkind = \"http\"\nadvertise = \"10.0.0.1:1\"\npoll_interval = \"0s\""
            ),
            "2 problems:\n  \
             m.toml: engine.poll_interval: a duration above 0s, like \"1s\"\n  \
             m.toml: engine.http: an [engine.http] table (kind = \"http\")"
        );
        assert_eq!(
            engine_err("[engine]\nkind = \"mirth\"\n"),
            "m.toml: engine.kind: \"reference\", \"http\" or \"exec\", got \"mirth\""
        );
        assert_eq!(
            engine_err(&format!("{GOOD_ENGINE}poll_interval = \"1s\"\n")),
            "m.toml: engine.poll_interval: only read with kind = \"http\" or kind = \"exec\" (this is kind = \"reference\")"
        );
    }

    const GOOD_ENGINE: &str = "[engine]\ndownstream = \"127.0.0.1:2576\"\n";

    #[test]
    fn exec_adapter_settings_and_errors() {
        let exec = r#"
            [engine]
            kind = "exec"
            advertise = "10.0.1.23:6661"
            poll_interval = "250ms"
            timeout = "2s"
            [engine.exec]
            queue_depth = ["bin/depth", "--all"]
            drain = ["enginectl", "pause"]
            resume = ["/opt/engine/bin/ctl", "resume"]
        "#;
        let EngineSection::Exec(a) = parse_engine(exec).expect("valid").engine else {
            panic!("kind = exec")
        };
        assert_eq!(a.poll_interval, Duration::from_millis(250));
        assert_eq!(a.timeout, Duration::from_secs(2));
        let x = a.adapter;
        assert_eq!(
            x.queue_depth,
            Argv {
                program: PathBuf::from("/etc/gru/bin/depth"),
                args: vec!["--all".to_owned()],
            },
            "a relative path is relative to the config"
        );
        assert_eq!(
            x.drain.program,
            PathBuf::from("enginectl"),
            "a bare name is looked up in PATH"
        );
        assert!(x.health.is_none() && x.drained.is_none());
        assert_eq!(
            engine_err(&exec.replace("drain = [\"enginectl\", \"pause\"]", "drain = []")),
            "m.toml: engine.exec.drain: a command line, like [\"/opt/engine/bin/ctl\", \"pause\"], starting with the program"
        );
        assert_eq!(
            engine_err(&exec.replace("queue_depth = [\"bin/depth\", \"--all\"]", "")),
            "m.toml: engine.exec.queue_depth: a command line, like [\"/opt/engine/bin/ctl\", \"pause\"]"
        );
        let e = engine_err(&exec.replace(
            "[engine.exec]",
            "[engine.http]\nusername = \"x\"\n[engine.exec]",
        ));
        assert!(
            e.contains(
                "m.toml: engine.http: only read with kind = \"http\" (this is kind = \"exec\")"
            ),
            "{e}"
        );
    }

    #[test]
    fn shedding_needs_connections_and_a_count() {
        let http = format!(
            "{HTTP}        connections = {{ url = \"https://127.0.0.1:8443/api/stats\", prometheus_metric = \"open_connections\" }}\n        \
             shed = {{ url = \"https://127.0.0.1:8443/api/listener/_shed?n={{count}}\", body = \"{{\\\"close\\\": {{count}}}}\" }}\n"
        );
        let EngineSection::Http(a) = parse_engine(&http).expect("valid").engine else {
            panic!("kind = http")
        };
        let shed = a.adapter.shed.expect("shed").with_count(5);
        assert_eq!(shed.method, Method::POST);
        assert_eq!(
            shed.url.to_string(),
            "https://127.0.0.1:8443/api/listener/_shed?n=5"
        );
        assert_eq!(shed.body.as_deref(), Some("{\"close\": 5}"));
        assert!(a.adapter.connections.is_some());
        assert_eq!(
            engine_err(&http.replace("{count}", "3")),
            "m.toml: engine.http.shed: {count} in its url or body, where the number of connections to close goes"
        );
        let no_connections: String = http
            .lines()
            .filter(|l| !l.contains("connections ="))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(
            engine_err(&no_connections)
                .starts_with("m.toml: engine.http.connections: { url = \"...\""),
            "{}",
            engine_err(&no_connections)
        );

        let exec = r#"
            [engine]
            kind = "exec"
            advertise = "10.0.1.23:6661"
            [engine.exec]
            queue_depth = ["bin/depth"]
            drain = ["enginectl", "pause"]
            resume = ["enginectl", "resume"]
            connections = ["enginectl", "connections"]
            shed = ["enginectl", "shed", "--count={count}"]
        "#;
        let EngineSection::Exec(a) = parse_engine(exec).expect("valid").engine else {
            panic!("kind = exec")
        };
        assert_eq!(
            a.adapter.shed.expect("shed").with_count(7).to_string(),
            "enginectl shed --count=7"
        );
        assert_eq!(
            engine_err(&exec.replace("--count={count}", "--all")),
            "m.toml: engine.exec.shed: {count} in an argument, where the number of connections to close goes, like [\"/opt/engine/bin/ctl\", \"shed\", \"{count}\"]"
        );
        assert!(
            engine_err(&exec.replace("connections = [\"enginectl\", \"connections\"]", ""))
                .starts_with("m.toml: engine.exec.connections: a command that prints the open inbound connections"),
        );
    }

    #[test]
    fn controller_is_one_address_or_a_list() {
        let parse = |value: &str| {
            MinionConfig::parse(
                Path::new("m.toml"),
                &GOOD.replace("\"https://127.0.0.1:7070\"", value),
            )
        };
        let one = parse("\"https://127.0.0.1:7070\"").expect("one address");
        assert_eq!(one.controller, "https://127.0.0.1:7070".to_owned());
        assert_eq!(one.controller.addresses().len(), 1);
        let two =
            parse("[\"https://ctl-a:7070\", \"https://10.0.0.2:7070/\", \"https://[fd00::3]\"]")
                .expect("a list");
        let a = two.controller.addresses();
        assert_eq!(
            a.iter().map(|a| (a.host(), a.port())).collect::<Vec<_>>(),
            vec![("ctl-a", 7070), ("10.0.0.2", 7070), ("fd00::3", 443)]
        );
        assert_eq!(
            two.controller.to_string(),
            "https://ctl-a:7070, https://10.0.0.2:7070, https://[fd00::3]"
        );
        let err = |value: &str| parse(value).expect_err(value).to_string();
        assert_eq!(err("[]"), "m.toml: controller: at least one address");
        assert_eq!(
            err("[\"https://a:7070\", \"http://b:7070\"]"),
            "m.toml: controller[1]: an https:// address (gRPC is always TLS)"
        );
        assert_eq!(
            err("[\"https://a:7070\", 7070]"),
            "m.toml: controller[1]: an address like \"https://10.0.0.2:7070\", got integer"
        );
        assert_eq!(
            err("[\"https://a:7070\", \"https://a:7070/\"]"),
            "m.toml: controller[1]: an address not listed already; \"https://a:7070/\" is also controller[0]"
        );
        assert_eq!(
            err("\"https://a:7070/grpc\""),
            "m.toml: controller: an address like \"https://10.0.0.2:7070\", got \"https://a:7070/grpc\""
        );
        assert_eq!(
            err("7070"),
            "m.toml: controller: an address like \"https://10.0.0.2:7070\" or a list of addresses, got integer"
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
