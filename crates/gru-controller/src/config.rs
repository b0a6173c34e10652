//! The controller's TOML config, parsed into typed, validated values.
//!
//! Every default is a named constant. A bad config is refused before anything
//! starts, with an error that names the file, the key and what was expected.
//! Relative paths are resolved against the config file's directory.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use gru_cloud::aws::SqsSignalConfig;
use gru_core::Bounds;
use gru_core::policy::{Behaviour, ForecastMode, Policy, PolicyError, Rule};
use gru_core::rebalance::{DEFAULT_REBALANCE, RebalanceLimits};
use gru_core::schedule::{Schedule, ScheduleSpec, WindowSpec};
use serde::Deserialize;

use crate::access::{Access, AccessRule, Role};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";
pub const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// Ten missed reports at the default interval.
pub const DEFAULT_LOST_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_JOIN_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_EVAL_INTERVAL: Duration = gru_core::policy::DEFAULT_EVAL_INTERVAL;
pub const DEFAULT_DRAIN_DEADLINE: Duration = Duration::from_secs(120);
/// Where the controller keeps its store: the systemd unit's
/// `StateDirectory=gru`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/gru";
/// An engine that stays unhealthy this long is replaced.
pub const DEFAULT_UNHEALTHY_TIMEOUT: Duration = Duration::from_secs(300);
/// The event log keeps this much history (the origin's operational
/// retention); `event_retention = "90d"` for continuity audits.
pub const DEFAULT_EVENT_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// On AWS, once a drained engine has no connection left, the controller
/// waits this long for the target to show `unused`, not the whole
/// deregistration delay (the load balancer has nothing left to carry).
pub const DEFAULT_UNUSED_GRACE: Duration = Duration::from_secs(10);
pub const DEFAULT_TARGET_QUEUE_PER_MINION: u32 = 8;
/// ELB's own default.
pub const DEFAULT_DEREGISTRATION_DELAY: Duration = Duration::from_secs(300);
/// How often the controller records a lifecycle action heartbeat for an
/// instance it is draining under the group's terminating hook: well inside
/// the hook's heartbeat timeout (AWS's default is one hour, a careful
/// operator sets minutes).
pub const DEFAULT_LIFECYCLE_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(30);
/// Streams one controller accepts per HTTP/2 connection. Each minion holds
/// one Session stream on its own connection, so this bounds admin fan-out
/// per connection rather than the number of minions.
pub const MAX_CONCURRENT_STREAMS: u32 = 1024;
pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
pub const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

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

/// The validated config.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    pub listen: SocketAddr,
    /// Where Prometheus metrics are served over plain HTTP (`/metrics`,
    /// `/healthz`, `/sd/minions`); off when `None`, the default.
    pub metrics_listen: Option<SocketAddr>,
    pub report_interval: Duration,
    pub lost_timeout: Duration,
    pub join_timeout: Duration,
    pub eval_interval: Duration,
    pub drain_deadline: Duration,
    /// A minion whose engine stays unhealthy this long is replaced.
    pub unhealthy_timeout: Duration,
    /// Where the store lives (minions, drains, overrides, events) when it is
    /// SQLite, and the minion CA by default.
    pub state_dir: PathBuf,
    /// `[store]`: SQLite in `state_dir` (default) or DynamoDB.
    pub store: StoreConfig,
    /// How long the event log keeps events.
    pub event_retention: Duration,
    /// See [`DEFAULT_UNUSED_GRACE`].
    pub unused_grace: Duration,
    pub tls: TlsFiles,
    /// Which admin certificates have which role (`[access]`).
    pub access: Access,
    /// The CA that issues minions their certificates (`[minion_ca]`).
    pub minion_ca: MinionCaConfig,
    /// `[[identity_signer]]`: per region, the certificate AWS signs instance
    /// identity documents with (read at start).
    pub identity_signers: Vec<IdentitySigner>,
    /// Minions joining with this token are trusted (gru dev, trusted networks).
    /// `None` when every fleet joins with identity documents.
    pub join_token_file: Option<PathBuf>,
    pub fleets: Vec<FleetConfig>,
}

#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Admin clients must present a certificate signed by this CA.
    pub client_ca: PathBuf,
    /// Minions present certificates signed by this one (`[minion_ca] cert`),
    /// also trusted for client certificates.
    pub minion_ca: Option<PathBuf>,
}

/// One `[[identity_signer]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentitySigner {
    pub region: String,
    pub cert: PathBuf,
}

/// `[minion_ca]`: where the controller keeps the CA it issues minion
/// certificates from, and for how long they are valid.
#[derive(Clone, Debug)]
pub struct MinionCaConfig {
    /// Made at the first start when neither it nor `key` exists.
    pub cert: PathBuf,
    pub key: PathBuf,
    pub lifetime: Duration,
}

/// `[store]`: where the controller keeps its state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreConfig {
    /// The default: a SQLite file in `state_dir`, for one controller.
    Sqlite,
    /// A DynamoDB table shared by several controllers, one of which leads
    /// on a lease kept in the same table (DESIGN.md, High availability).
    Dynamodb(DynamoStoreConfig),
}

/// `[store] kind = "dynamodb"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DynamoStoreConfig {
    pub table: String,
    pub region: String,
    /// Another endpoint than AWS's (a test's moto, a VPC endpoint).
    pub endpoint_url: Option<String>,
    pub leader: LeaderConfig,
}

/// How a controller leads: its name, where it serves, and the lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderConfig {
    /// How this controller is named in the lease and in `gru controller
    /// status`; the host name by default.
    pub name: String,
    /// The address minions and the CLI reach this controller at, handed to
    /// them by standbys; `https://<host name>:<listen port>` by default.
    pub advertise: String,
    /// How long the lease lasts unrenewed: a standby takes over after the
    /// lease's version stayed unchanged this long.
    pub lease: Duration,
    /// How often the leader renews the lease.
    pub heartbeat: Duration,
}

/// The lease's default duration: Kubernetes' leader-election default.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(15);
/// The leader renews this often: five renewals per lease, so two lost
/// renewals in a row cost nothing.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(3);

/// The host's name (Linux), for the lease holder's default name.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "controller".to_owned())
}

/// How long a minion certificate is valid unless `[minion_ca] lifetime`
/// says otherwise; agents renew at two thirds of it.
pub const DEFAULT_MINION_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

#[derive(Clone, Debug)]
pub struct FleetConfig {
    pub name: String,
    /// Bounds, rules, behaviour and schedules, validated.
    pub policy: Policy,
    pub provider: ProviderConfig,
    /// How in-service minions' long-lived connections are spread onto new
    /// ones (`[fleet.rebalance]`); `None` when `enabled = false`.
    pub rebalance: Option<RebalanceLimits>,
    /// An SQS queue whose backlog also sizes the fleet (`[fleet.sqs]`); its
    /// rule is in `policy` as `external sqs`.
    pub sqs: Option<SqsSignalConfig>,
    /// `[fleet.identity]`: minions join with EC2 instance identity
    /// documents checked by these rules, and the join token is refused.
    pub identity: Option<crate::identity::IdentityRules>,
}

impl FleetConfig {
    pub fn bounds(&self) -> Bounds {
        self.policy.bounds()
    }
}

#[derive(Clone, Debug)]
pub enum ProviderConfig {
    Local(LocalProviderConfig),
    Aws(AwsProviderConfig),
}

impl ProviderConfig {
    pub fn name(&self) -> &'static str {
        match self {
            ProviderConfig::Local(_) => "local",
            ProviderConfig::Aws(_) => "aws",
        }
    }

    /// The AWS settings, for an AWS fleet.
    pub fn aws(&self) -> Option<&AwsProviderConfig> {
        match self {
            ProviderConfig::Aws(a) => Some(a),
            ProviderConfig::Local(_) => None,
        }
    }
}

/// An EC2 Auto Scaling group and an ELBv2 target group (`[fleet.aws]`).
#[derive(Clone, Debug)]
pub struct AwsProviderConfig {
    /// What gru-aws connects with; validated by it.
    pub fleet: gru_cloud::aws::AwsFleetConfig,
    /// How often a drain under the terminating hook records a heartbeat.
    pub heartbeat_interval: Duration,
}

/// Minions as child processes of the controller and a TCP load balancer in
/// its process; what `gru dev` runs.
#[derive(Clone, Debug)]
pub struct LocalProviderConfig {
    /// Where the load balancer listens.
    pub listen: SocketAddr,
    /// Passed to each `gru minion --config`.
    pub minion_config: PathBuf,
    pub deregistration_delay: Duration,
    /// Each minion's output goes to `<log_dir>/<instance>.log`.
    pub log_dir: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    metrics_listen: Option<String>,
    #[serde(default, with = "humantime_serde")]
    report_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    lost_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    join_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    eval_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    drain_deadline: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    unhealthy_timeout: Option<Duration>,
    state_dir: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    event_retention: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    unused_grace: Option<Duration>,
    tls: Option<RawTls>,
    join_token_file: Option<PathBuf>,
    access: Option<RawAccess>,
    minion_ca: Option<RawMinionCa>,
    store: Option<RawStore>,
    #[serde(default)]
    identity_signer: Vec<RawIdentitySigner>,
    #[serde(default)]
    fleet: Vec<RawFleet>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentitySigner {
    region: Option<String>,
    cert: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    #[serde(default)]
    accounts: Vec<String>,
    region: Option<String>,
    #[serde(default, with = "humantime_serde")]
    max_age: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    kind: Option<String>,
    table: Option<String>,
    region: Option<String>,
    endpoint_url: Option<String>,
    name: Option<String>,
    advertise: Option<String>,
    #[serde(default, with = "humantime_serde")]
    lease: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    heartbeat: Option<Duration>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMinionCa {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    lifetime: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccess {
    default_role: Option<String>,
    #[serde(default)]
    rule: Vec<RawAccessRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccessRule {
    common_name: Option<String>,
    organizational_unit: Option<String>,
    role: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFleet {
    name: Option<String>,
    provider: Option<String>,
    min: Option<u32>,
    max: Option<u32>,
    target_queue_per_minion: Option<u32>,
    target_utilization: Option<f64>,
    #[serde(default, with = "humantime_serde")]
    target_latency: Option<Duration>,
    max_step_out: Option<u32>,
    max_step_in: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    scale_out_cooldown: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    scale_in_cooldown: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    scale_in_stabilization: Option<Duration>,
    tolerance: Option<f64>,
    #[serde(default, with = "humantime_serde")]
    clear_backlog_within: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    boot_time: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    hold_within: Option<Duration>,
    service_rate: Option<f64>,
    break_even_hold: Option<bool>,
    forecast: Option<RawForecast>,
    #[serde(default)]
    schedule: Vec<RawSchedule>,
    local: Option<RawLocal>,
    aws: Option<RawAws>,
    rebalance: Option<RawRebalance>,
    sqs: Option<RawSqs>,
    identity: Option<RawIdentity>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForecast {
    mode: Option<String>,
    #[serde(default, with = "humantime_serde")]
    min_history: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSqs {
    queue_url: Option<String>,
    target_per_minion: Option<u32>,
    activation: Option<u64>,
    region: Option<String>,
    endpoint_url: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRebalance {
    enabled: Option<bool>,
    tolerance: Option<u64>,
    max_fraction: Option<f64>,
    #[serde(default, with = "humantime_serde")]
    cooldown: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchedule {
    name: Option<String>,
    timezone: Option<String>,
    /// Weekly windows: days (`mon-fri`, `sat,sun`, `*`) and local hh:mm times.
    days: Option<String>,
    from: Option<String>,
    to: Option<String>,
    /// Cron windows: 5-field expressions for when it opens and closes.
    start: Option<String>,
    end: Option<String>,
    min: Option<u32>,
    max: Option<u32>,
    desired: Option<u32>,
    #[serde(default)]
    priority: i32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLocal {
    listen: Option<String>,
    minion_config: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    deregistration_delay: Option<Duration>,
    log_dir: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAws {
    region: Option<String>,
    group_name: Option<String>,
    target_group_arn: Option<String>,
    launching_hook: Option<String>,
    terminating_hook: Option<String>,
    max_attempts: Option<u32>,
    /// Another endpoint for every AWS service (tests against moto).
    endpoint_url: Option<String>,
    #[serde(default, with = "humantime_serde")]
    heartbeat_interval: Option<Duration>,
}

/// `[access]`: the rules as written, each with a role and at least one
/// attribute to match.
fn access(v: &Validator, raw: RawAccess) -> Result<Access, ConfigError> {
    let role = |key: &str, s: &str| {
        Role::parse(s).ok_or_else(|| {
            v.invalid(
                key,
                format!("one of \"viewer\", \"operator\", \"admin\", got {s:?}"),
            )
        })
    };
    let default_role = match raw.default_role.as_deref() {
        None | Some("none") => None,
        Some(s) => Some(role("access.default_role", s).map_err(|_| {
            v.invalid(
                "access.default_role",
                format!("one of \"none\", \"viewer\", \"operator\", \"admin\", got {s:?}"),
            )
        })?),
    };
    let mut rules = Vec::new();
    for (i, r) in raw.rule.into_iter().enumerate() {
        let key = |k: &str| format!("access.rule[{i}].{k}");
        let Some(name) = r.role else {
            return Err(v.invalid(
                &key("role"),
                "the role this rule gives: viewer, operator or admin",
            ));
        };
        let role = role(&key("role"), &name)?;
        let nonempty = |s: Option<String>, k: &str| match s {
            Some(s) if s.trim().is_empty() => Err(v.invalid(&key(k), "a non-empty value")),
            s => Ok(s),
        };
        let common_name = nonempty(r.common_name, "common_name")?;
        let organizational_unit = nonempty(r.organizational_unit, "organizational_unit")?;
        if common_name.is_none() && organizational_unit.is_none() {
            return Err(v.invalid(
                &format!("access.rule[{i}]"),
                "common_name or organizational_unit (or both) to match a certificate's subject",
            ));
        }
        rules.push(AccessRule {
            common_name,
            organizational_unit,
            role,
        });
    }
    Ok(Access {
        rules,
        default_role,
    })
}

impl ControllerConfig {
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.to_owned(),
            source,
        })?;
        Self::parse(file, &text)
    }

    /// Parses `text` as if read from `file` (used for messages and for
    /// resolving relative paths).
    pub fn parse(file: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let base = file.parent().unwrap_or(Path::new("."));
        let v = Validator { file };
        let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };

        // Every independent problem is reported, not only the first: each
        // top-level key, and each fleet (the first problem within a fleet).
        let mut errors = Vec::new();
        let listen = keep(
            &mut errors,
            v.addr("listen", raw.listen.as_deref().unwrap_or(DEFAULT_LISTEN)),
        );
        let metrics_listen = match raw.metrics_listen.as_deref() {
            None => None,
            Some(a) => keep(&mut errors, v.addr("metrics_listen", a)).map(Some),
        };
        let report_interval = keep(
            &mut errors,
            v.positive(
                "report_interval",
                raw.report_interval.unwrap_or(DEFAULT_REPORT_INTERVAL),
            ),
        );
        let lost_timeout = keep(
            &mut errors,
            v.positive(
                "lost_timeout",
                raw.lost_timeout.unwrap_or(DEFAULT_LOST_TIMEOUT),
            ),
        );
        if let (Some(report_interval), Some(lost_timeout)) = (report_interval, lost_timeout)
            && lost_timeout < report_interval * 2
        {
            errors.push(v.invalid(
                "lost_timeout",
                format!(
                    "at least twice report_interval ({}), got {}",
                    humantime::format_duration(report_interval),
                    humantime::format_duration(lost_timeout)
                ),
            ));
        }
        let join_timeout = keep(
            &mut errors,
            v.positive(
                "join_timeout",
                raw.join_timeout.unwrap_or(DEFAULT_JOIN_TIMEOUT),
            ),
        );
        let eval_interval = keep(
            &mut errors,
            v.positive(
                "eval_interval",
                raw.eval_interval.unwrap_or(DEFAULT_EVAL_INTERVAL),
            ),
        );
        let drain_deadline = keep(
            &mut errors,
            v.positive(
                "drain_deadline",
                raw.drain_deadline.unwrap_or(DEFAULT_DRAIN_DEADLINE),
            ),
        );
        let unhealthy_timeout = keep(
            &mut errors,
            v.positive(
                "unhealthy_timeout",
                raw.unhealthy_timeout.unwrap_or(DEFAULT_UNHEALTHY_TIMEOUT),
            ),
        );
        let event_retention = keep(
            &mut errors,
            v.positive(
                "event_retention",
                raw.event_retention.unwrap_or(DEFAULT_EVENT_RETENTION),
            ),
        );
        let unused_grace = raw.unused_grace.unwrap_or(DEFAULT_UNUSED_GRACE);
        let state_dir = match raw.state_dir {
            Some(p) if p.as_os_str().is_empty() => {
                errors.push(v.invalid("state_dir", "a directory for the controller's store"));
                None
            }
            Some(p) => Some(resolve(p)),
            None => Some(PathBuf::from(DEFAULT_STATE_DIR)),
        };
        let tls = keep(
            &mut errors,
            raw.tls.ok_or_else(|| {
                v.invalid(
                    "tls",
                    "a [tls] table with cert, key and client_ca (gRPC is always TLS)",
                )
            }),
        )
        .map(|tls| TlsFiles {
            cert: resolve(tls.cert),
            key: resolve(tls.key),
            client_ca: resolve(tls.client_ca),
            minion_ca: None,
        });
        let minion_ca_given = raw
            .minion_ca
            .as_ref()
            .is_some_and(|m| m.cert.is_some() && m.key.is_some());
        let store = match raw.store {
            None => StoreConfig::Sqlite,
            Some(s) => keep(
                &mut errors,
                store(&v, s, listen.map(|l| l.port()), minion_ca_given),
            )
            .unwrap_or(StoreConfig::Sqlite),
        };
        let minion_ca = {
            let raw = raw.minion_ca.unwrap_or_default();
            let state = state_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
            let lifetime = raw.lifetime.unwrap_or(DEFAULT_MINION_CERT_LIFETIME);
            if lifetime < Duration::from_secs(1) {
                errors.push(v.invalid(
                    "minion_ca.lifetime",
                    "a duration of at least 1s, like \"24h\"",
                ));
            }
            match (raw.cert, raw.key) {
                (Some(cert), Some(key)) => MinionCaConfig {
                    cert: resolve(cert),
                    key: resolve(key),
                    lifetime,
                },
                (None, None) => MinionCaConfig {
                    cert: state.join("minion-ca.pem"),
                    key: state.join("minion-ca.key"),
                    lifetime,
                },
                (Some(_), None) | (None, Some(_)) => {
                    errors.push(v.invalid(
                        "minion_ca",
                        "both cert and key, or neither (then the controller keeps its own in state_dir)",
                    ));
                    MinionCaConfig {
                        cert: PathBuf::new(),
                        key: PathBuf::new(),
                        lifetime,
                    }
                }
            }
        };
        let mut identity_signers = Vec::new();
        for (i, raw) in raw.identity_signer.into_iter().enumerate() {
            match (raw.region, raw.cert) {
                (Some(region), Some(cert)) if !region.is_empty() => {
                    identity_signers.push(IdentitySigner {
                        region,
                        cert: resolve(cert),
                    })
                }
                _ => errors.push(v.invalid(
                    &format!("identity_signer[{i}]"),
                    "a region and the path of AWS's RSA certificate for it (the one for the base64 signature)",
                )),
            }
        }
        let tls = tls.map(|mut t| {
            t.minion_ca = Some(minion_ca.cert.clone());
            t
        });
        let join_token_file = raw.join_token_file.map(resolve);
        // As written, so that a fleet with another error still counts.
        let every_fleet_by_identity =
            !raw.fleet.is_empty() && raw.fleet.iter().all(|f| f.identity.is_some());

        let access = match raw.access {
            None => Access::default(),
            Some(a) => keep(&mut errors, access(&v, a)).unwrap_or_default(),
        };

        if raw.fleet.is_empty() {
            errors.push(v.invalid("fleet", "at least one [[fleet]] table"));
        }
        let mut names = BTreeSet::new();
        let mut fleets = Vec::new();
        for (i, f) in raw.fleet.into_iter().enumerate() {
            let parse_fleet = || -> Result<FleetConfig, ConfigError> {
                let key = |k: &str| format!("fleet[{i}].{k}");
                let name = f
                    .name
                    .ok_or_else(|| v.invalid(&key("name"), "a fleet name"))?;
                if name.is_empty()
                    || !name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                {
                    return Err(v.invalid(
                        &key("name"),
                        format!("letters, digits, '-' or '_', got {name:?}"),
                    ));
                }
                if !names.insert(name.clone()) {
                    return Err(v.invalid(
                        &key("name"),
                        format!("a unique name, {name:?} is used twice"),
                    ));
                }
                let min = f.min.unwrap_or(0);
                let max = f
                    .max
                    .ok_or_else(|| v.invalid(&key("max"), "the fleet's maximum size"))?;
                let bounds =
                    Bounds::new(min, max).map_err(|e| v.invalid(&key("max"), e.to_string()))?;
                // Sized on rates when a utilization is given (the queue
                // depth rule then only if asked for as well), else on the
                // queue.
                let mut rules = Vec::new();
                if let Some(utilization) = f.target_utilization {
                    rules.push(Rule::Arrivals { utilization });
                }
                if f.target_utilization.is_none() || f.target_queue_per_minion.is_some() {
                    rules.push(Rule::QueueDepth {
                        target_per_minion: f
                            .target_queue_per_minion
                            .unwrap_or(DEFAULT_TARGET_QUEUE_PER_MINION),
                    });
                }
                if let Some(target) = f.target_latency {
                    rules.push(Rule::Latency { target });
                }
                let sqs = f.sqs.map(|raw| sqs_signal(&v, &key, raw)).transpose()?;
                if let Some(q) = &sqs {
                    rules.push(Rule::External {
                        signal: "sqs".to_owned(),
                        target_per_minion: q.target_per_minion,
                        activation: q.activation,
                    });
                }
                let defaults = Behaviour::default();
                let behaviour = Behaviour {
                    max_step_out: f.max_step_out.unwrap_or(defaults.max_step_out),
                    max_step_in: f.max_step_in.unwrap_or(defaults.max_step_in),
                    scale_out_cooldown: f.scale_out_cooldown.unwrap_or(defaults.scale_out_cooldown),
                    scale_in_cooldown: f.scale_in_cooldown.unwrap_or(defaults.scale_in_cooldown),
                    scale_in_stabilization: f
                        .scale_in_stabilization
                        .unwrap_or(defaults.scale_in_stabilization),
                    tolerance: f.tolerance.unwrap_or(defaults.tolerance),
                    clear_backlog_within: f
                        .clear_backlog_within
                        .unwrap_or(defaults.clear_backlog_within),
                    boot_time: f.boot_time.unwrap_or(defaults.boot_time),
                    hold_within: f.hold_within.unwrap_or(defaults.hold_within),
                    eval_interval: eval_interval.unwrap_or(DEFAULT_EVAL_INTERVAL),
                    service_rate: f.service_rate,
                    break_even_hold: f.break_even_hold.unwrap_or(defaults.break_even_hold),
                    forecast: match f.forecast.as_ref().and_then(|r| r.mode.as_deref()) {
                        None => defaults.forecast,
                        Some(m) => ForecastMode::parse(m).ok_or_else(|| {
                            v.invalid(
                                &key("forecast.mode"),
                                format!("\"off\", \"forecast_only\" or \"on\", got {m:?}"),
                            )
                        })?,
                    },
                    forecast_min_history: f
                        .forecast
                        .as_ref()
                        .and_then(|r| r.min_history)
                        .unwrap_or(defaults.forecast_min_history),
                };
                let mut schedules = Vec::new();
                for (j, raw) in f.schedule.iter().enumerate() {
                    let skey = |k: &str| key(&format!("schedule[{j}].{k}"));
                    let window = match (&raw.days, &raw.from, &raw.to, &raw.start, &raw.end) {
                        (Some(days), Some(from), Some(to), None, None) => {
                            WindowSpec::Weekly { days, from, to }
                        }
                        (None, None, None, Some(start), Some(end)) => {
                            WindowSpec::Cron { start, end }
                        }
                        _ => {
                            return Err(v.invalid(
                                &skey("days"),
                                "either days + from + to (e.g. \"mon-fri\", \"19:00\", \"07:00\") or cron start + end",
                            ));
                        }
                    };
                    let spec = ScheduleSpec {
                        name: raw.name.as_deref().unwrap_or(""),
                        timezone: raw.timezone.as_deref().ok_or_else(|| {
                            v.invalid(
                                &skey("timezone"),
                                "an IANA time zone, e.g. \"America/Detroit\"",
                            )
                        })?,
                        window,
                        min: raw.min,
                        max: raw.max,
                        desired: raw.desired,
                        priority: raw.priority,
                    };
                    let schedule = Schedule::new(&spec)
                        .map_err(|e| v.invalid(&skey(e.field()), gru_core::error_chain(&e)))?;
                    schedules.push(schedule);
                }
                let policy = Policy::new(bounds, rules.clone(), behaviour, schedules)
                    .map_err(|e| v.invalid(&key(&policy_key(&e, &rules)), e.to_string()))?;
                let other_table = match f.provider.as_deref() {
                    Some("local") => f.aws.is_some().then_some("aws"),
                    Some("aws") => f.local.is_some().then_some("local"),
                    _ => None,
                };
                if let Some(table) = other_table {
                    return Err(v.invalid(
                        &key(table),
                        format!(
                            "no [fleet.{table}] table for provider {:?}",
                            f.provider.unwrap_or_default()
                        ),
                    ));
                }
                let provider = match f.provider.as_deref() {
                    Some("local") => {
                        let l = f.local.ok_or_else(|| {
                            v.invalid(
                                &key("local"),
                                "a [fleet.local] table for provider \"local\"",
                            )
                        })?;
                        let lb_key = key("local.listen");
                        let listen = v.addr(
                            &lb_key,
                            l.listen.as_deref().ok_or_else(|| {
                                v.invalid(&lb_key, "the load balancer's listen address")
                            })?,
                        )?;
                        let minion_config = resolve(l.minion_config.ok_or_else(|| {
                            v.invalid(
                                &key("local.minion_config"),
                                "the path of the minions' config",
                            )
                        })?);
                        ProviderConfig::Local(LocalProviderConfig {
                            listen,
                            minion_config,
                            deregistration_delay: l
                                .deregistration_delay
                                .unwrap_or(DEFAULT_DEREGISTRATION_DELAY),
                            log_dir: l.log_dir.map(resolve),
                        })
                    }
                    Some("aws") => {
                        let a = f.aws.ok_or_else(|| {
                            v.invalid(&key("aws"), "a [fleet.aws] table for provider \"aws\"")
                        })?;
                        ProviderConfig::Aws(aws_provider(&v, &key, a)?)
                    }
                    Some(other) => {
                        return Err(v.invalid(
                            &key("provider"),
                            format!("\"local\" or \"aws\", got {other:?}"),
                        ));
                    }
                    None => {
                        return Err(v.invalid(&key("provider"), "a provider, \"local\" or \"aws\""));
                    }
                };
                let rebalance = rebalance(&v, &key, f.rebalance)?;
                let aws_region = match &provider {
                    ProviderConfig::Aws(a) => a.fleet.region.clone().or_else(|| {
                        // arn:aws:elasticloadbalancing:REGION:ACCOUNT:…
                        a.fleet
                            .target_group_arn
                            .split(':')
                            .nth(3)
                            .map(str::to_owned)
                    }),
                    ProviderConfig::Local(_) => None,
                };
                let identity = f
                    .identity
                    .map(|raw| identity_rules(&v, &key, raw, aws_region))
                    .transpose()?;
                Ok(FleetConfig {
                    name,
                    policy,
                    provider,
                    rebalance,
                    sqs,
                    identity,
                })
            };
            match parse_fleet() {
                Ok(fleet) => fleets.push(fleet),
                Err(e) => errors.push(e),
            }
        }

        for (i, f) in fleets.iter().enumerate() {
            if let Some(rules) = &f.identity
                && !identity_signers.iter().any(|s| s.region == rules.region)
                && !crate::identity::AWS_SIGNERS
                    .iter()
                    .any(|(r, _)| *r == rules.region)
            {
                errors.push(v.invalid(
                    &format!("fleet[{i}].identity.region"),
                    format!(
                        "a region whose certificate gru ships, or one with an [[identity_signer]] (AWS's certificate for it), got {:?}",
                        rules.region
                    ),
                ));
            }
        }
        if join_token_file.is_none() && !every_fleet_by_identity {
            errors.push(v.invalid(
                "join_token_file",
                "a path to the minions' join token (only when every fleet has [fleet.identity] do minions join without one)",
            ));
        }
        match (
            listen,
            report_interval,
            lost_timeout,
            join_timeout,
            eval_interval,
            drain_deadline,
            (unhealthy_timeout, event_retention, state_dir),
            tls,
        ) {
            (
                Some(listen),
                Some(report_interval),
                Some(lost_timeout),
                Some(join_timeout),
                Some(eval_interval),
                Some(drain_deadline),
                (Some(unhealthy_timeout), Some(event_retention), Some(state_dir)),
                Some(tls),
            ) if errors.is_empty() => Ok(ControllerConfig {
                listen,
                metrics_listen: metrics_listen.flatten(),
                report_interval,
                lost_timeout,
                join_timeout,
                eval_interval,
                drain_deadline,
                unhealthy_timeout,
                state_dir,
                store,
                event_retention,
                unused_grace,
                tls,
                access,
                minion_ca,
                identity_signers,
                join_token_file,
                fleets,
            }),
            _ if errors.len() == 1 => Err(errors.remove(0)),
            _ => Err(ConfigError::Many(errors)),
        }
    }
}

/// `[fleet.aws]` into gru-aws's config, checked by gru-aws's own rules;
/// errors name `fleet[i].aws.<key>`.
fn aws_provider(
    v: &Validator<'_>,
    key: &dyn Fn(&str) -> String,
    a: RawAws,
) -> Result<AwsProviderConfig, ConfigError> {
    let akey = |k: &str| key(&format!("aws.{k}"));
    let group_name = a
        .group_name
        .ok_or_else(|| v.invalid(&akey("group_name"), "the Auto Scaling group's name"))?;
    let target_group_arn = a.target_group_arn.ok_or_else(|| {
        v.invalid(
            &akey("target_group_arn"),
            "the ARN of the fleet's ELBv2 target group",
        )
    })?;
    let mut fleet = gru_cloud::aws::AwsFleetConfig::new(group_name, target_group_arn);
    fleet.region = a.region;
    fleet.launching_hook = a.launching_hook;
    fleet.terminating_hook = a.terminating_hook;
    fleet.endpoint_url = a.endpoint_url;
    fleet.max_attempts = a
        .max_attempts
        .unwrap_or(gru_cloud::aws::DEFAULT_MAX_ATTEMPTS);
    if let Err(e) = fleet.validate() {
        use gru_cloud::aws::AwsSettingsError as E;
        let k = match &e {
            E::EmptyGroupName => "group_name",
            E::EmptyHookName { hook } => hook,
            E::NoAttempts => "max_attempts",
            E::NotATargetGroupArn { .. } => "target_group_arn",
            E::RegionMismatch { .. } => "region",
        };
        return Err(v.invalid(&akey(k), e.to_string()));
    }
    let heartbeat_interval = v.positive(
        &akey("heartbeat_interval"),
        a.heartbeat_interval
            .unwrap_or(DEFAULT_LIFECYCLE_HEARTBEAT_INTERVAL),
    )?;
    Ok(AwsProviderConfig {
        fleet,
        heartbeat_interval,
    })
}

/// The config key of a policy error: `rules[1].target` → `target_latency`.
fn policy_key(e: &PolicyError, rules: &[Rule]) -> String {
    let path = e.path();
    if let Some(rest) = path.strip_prefix("behaviour.") {
        return rest.to_owned();
    }
    if let Some(rest) = path.strip_prefix("schedules") {
        return format!("schedule{rest}");
    }
    match e.rule().and_then(|i| rules.get(i)) {
        Some(Rule::QueueDepth { .. }) => "target_queue_per_minion".to_owned(),
        Some(Rule::Latency { .. }) => "target_latency".to_owned(),
        Some(Rule::Arrivals { .. }) => "target_utilization".to_owned(),
        Some(Rule::External { .. }) => "sqs.target_per_minion".to_owned(),
        None => path,
    }
}

/// The value, or None with its error kept for the report.
fn keep<T>(errors: &mut Vec<ConfigError>, r: Result<T, ConfigError>) -> Option<T> {
    r.map_err(|e| errors.push(e)).ok()
}

impl ControllerConfig {
    /// What `--check-config` adds to reading `file`: the files the
    /// controller will read can be read, the directories it writes can be
    /// made, and no two listeners want one address. Starts and creates
    /// nothing. Every problem is reported, each with its key.
    pub fn check_environment(&self, file: &Path) -> Result<(), ConfigError> {
        use gru_proto::preflight;
        let v = Validator { file };
        let mut errors = Vec::new();
        let mut read = |key: &str, path: &Path, what: &str| {
            if let Err(why) = preflight::readable(path) {
                errors.push(v.invalid(key, format!("{what}; {why}")));
            }
        };
        read(
            "tls.cert",
            &self.tls.cert,
            "the controller's certificate (PEM)",
        );
        read("tls.key", &self.tls.key, "its private key (PEM)");
        read(
            "tls.client_ca",
            &self.tls.client_ca,
            "the CA that signs admin certificates (PEM)",
        );
        if let Some(token) = &self.join_token_file {
            read("join_token_file", token, "the minions' join token");
        }
        for (i, s) in self.identity_signers.iter().enumerate() {
            read(
                &format!("identity_signer[{i}].cert"),
                &s.cert,
                "AWS's RSA certificate for identity documents of the region (PEM)",
            );
        }
        for (i, f) in self.fleets.iter().enumerate() {
            if let ProviderConfig::Local(l) = &f.provider {
                read(
                    &format!("fleet[{i}].local.minion_config"),
                    &l.minion_config,
                    "the config local minions start with",
                );
            }
        }
        let mut dirs = vec![("state_dir".to_owned(), self.state_dir.clone())];
        let mut listeners = vec![("listen".to_owned(), self.listen)];
        if let Some(m) = self.metrics_listen {
            listeners.push(("metrics_listen".to_owned(), m));
        }
        for (i, f) in self.fleets.iter().enumerate() {
            if let ProviderConfig::Local(l) = &f.provider {
                listeners.push((format!("fleet[{i}].local.listen"), l.listen));
                if let Some(d) = &l.log_dir {
                    dirs.push((format!("fleet[{i}].local.log_dir"), d.clone()));
                }
            }
        }
        for (key, dir) in &dirs {
            if let Err(why) = preflight::directory(dir) {
                errors.push(v.invalid(key, format!("a directory; {why}")));
            }
        }
        let named: Vec<(&str, SocketAddr)> =
            listeners.iter().map(|(k, a)| (k.as_str(), *a)).collect();
        for (key, other, addr) in preflight::clashes(&named) {
            errors.push(v.invalid(
                key,
                format!("an address of its own; {addr} is also {other}'s"),
            ));
        }
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            _ => Err(ConfigError::Many(errors)),
        }
    }
}

/// `[fleet.rebalance]`: on by default with [`DEFAULT_REBALANCE`].
fn rebalance(
    v: &Validator,
    key: &dyn Fn(&str) -> String,
    raw: Option<RawRebalance>,
) -> Result<Option<RebalanceLimits>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(Some(DEFAULT_REBALANCE));
    };
    if raw.enabled == Some(false) {
        return Ok(None);
    }
    let max_fraction = raw.max_fraction.unwrap_or(DEFAULT_REBALANCE.max_fraction);
    if !(max_fraction > 0.0 && max_fraction <= 1.0) {
        return Err(v.invalid(
            &key("rebalance.max_fraction"),
            format!(
                "a fraction of the fleet's connections above 0 and at most 1, got {max_fraction}"
            ),
        ));
    }
    Ok(Some(RebalanceLimits {
        tolerance: raw.tolerance.unwrap_or(DEFAULT_REBALANCE.tolerance),
        max_fraction,
        cooldown: raw.cooldown.unwrap_or(DEFAULT_REBALANCE.cooldown),
    }))
}

/// `[store]`: the backend and, for DynamoDB, the table and the lease.
fn store(
    v: &Validator,
    raw: RawStore,
    listen_port: Option<u16>,
    minion_ca_given: bool,
) -> Result<StoreConfig, ConfigError> {
    match raw.kind.as_deref() {
        None | Some("sqlite") => {
            let extra = [
                ("table", raw.table.is_some()),
                ("region", raw.region.is_some()),
                ("endpoint_url", raw.endpoint_url.is_some()),
                ("name", raw.name.is_some()),
                ("advertise", raw.advertise.is_some()),
                ("lease", raw.lease.is_some()),
                ("heartbeat", raw.heartbeat.is_some()),
            ];
            if let Some((k, _)) = extra.iter().find(|(_, set)| *set) {
                return Err(v.invalid(
                    &format!("store.{k}"),
                    "nothing: it is a setting of kind = \"dynamodb\" (the SQLite store lives in state_dir)",
                ));
            }
            Ok(StoreConfig::Sqlite)
        }
        Some("dynamodb") => {
            let table = raw.table.filter(|t| {
                (3..=255).contains(&t.len())
                    && t.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
            });
            let table = table.ok_or_else(|| {
                v.invalid(
                    "store.table",
                    "the DynamoDB table's name (3 to 255 of a-z, A-Z, 0-9, _ . -), like \"gru-state\"",
                )
            })?;
            let region = raw.region.filter(|r| !r.is_empty()).ok_or_else(|| {
                v.invalid(
                    "store.region",
                    "the region the table is in, like \"eu-west-1\"",
                )
            })?;
            if let Some(url) = &raw.endpoint_url
                && !(url.starts_with("https://") || url.starts_with("http://"))
            {
                return Err(v.invalid(
                    "store.endpoint_url",
                    "a URL like \"https://dynamodb.eu-west-1.amazonaws.com\"",
                ));
            }
            let lease = raw.lease.unwrap_or(DEFAULT_LEASE);
            let heartbeat = raw.heartbeat.unwrap_or(DEFAULT_HEARTBEAT);
            if lease < Duration::from_secs(1) {
                return Err(v.invalid("store.lease", "a duration of at least 1s, like \"15s\""));
            }
            if heartbeat.is_zero() || heartbeat * 3 > lease {
                return Err(v.invalid(
                    "store.heartbeat",
                    format!(
                        "a duration above 0 and at most a third of the lease ({}), so a renewal can be lost without losing the lease",
                        humantime::format_duration(lease)
                    ),
                ));
            }
            if !minion_ca_given {
                return Err(v.invalid(
                    "minion_ca",
                    "cert and key that every controller sharing the table reads (with kind = \"dynamodb\", a minion's certificate must be valid at whichever controller leads)",
                ));
            }
            let name = raw.name.unwrap_or_else(host_name);
            if name.is_empty() {
                return Err(v.invalid("store.name", "this controller's name in the lease"));
            }
            let advertise = match raw.advertise {
                Some(a) if a.starts_with("https://") => a,
                Some(_) => {
                    return Err(v.invalid(
                        "store.advertise",
                        "the https:// address minions and the CLI reach this controller at",
                    ));
                }
                None => format!("https://{}:{}", host_name(), listen_port.unwrap_or(7070)),
            };
            Ok(StoreConfig::Dynamodb(DynamoStoreConfig {
                table,
                region,
                endpoint_url: raw.endpoint_url,
                leader: LeaderConfig {
                    name,
                    advertise,
                    lease,
                    heartbeat,
                },
            }))
        }
        Some(other) => Err(v.invalid(
            "store.kind",
            format!("\"sqlite\" (the default) or \"dynamodb\", got \"{other}\""),
        )),
    }
}

/// `[fleet.sqs]`, checked without any AWS call.
/// `[fleet.identity]`: accounts and a region, both required (the region
/// defaults to the AWS fleet's own).
fn identity_rules(
    v: &Validator,
    key: &dyn Fn(&str) -> String,
    raw: RawIdentity,
    aws_region: Option<String>,
) -> Result<crate::identity::IdentityRules, ConfigError> {
    if raw.accounts.is_empty()
        || raw
            .accounts
            .iter()
            .any(|a| a.len() != 12 || !a.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(v.invalid(
            &key("identity.accounts"),
            "the AWS account ids (12 digits each) whose instances may join, like [\"123456789012\"]",
        ));
    }
    let region = raw.region.or(aws_region).ok_or_else(|| {
        v.invalid(
            &key("identity.region"),
            "the region the fleet's instances run in, like \"eu-west-1\"",
        )
    })?;
    let max_age = raw.max_age.unwrap_or(crate::identity::DEFAULT_MAX_AGE);
    if max_age.is_zero() {
        return Err(v.invalid(
            &key("identity.max_age"),
            "how long after launch an instance may join, like \"5m\"",
        ));
    }
    Ok(crate::identity::IdentityRules {
        accounts: raw.accounts,
        region,
        max_age,
    })
}

fn sqs_signal(
    v: &Validator,
    key: &dyn Fn(&str) -> String,
    raw: RawSqs,
) -> Result<SqsSignalConfig, ConfigError> {
    let queue_url = raw.queue_url.ok_or_else(|| {
        v.invalid(
            &key("sqs.queue_url"),
            "the queue's URL, like \"https://sqs.eu-west-1.amazonaws.com/123456789012/hl7-inbound\"",
        )
    })?;
    let target_per_minion = raw.target_per_minion.ok_or_else(|| {
        v.invalid(
            &key("sqs.target_per_minion"),
            "the messages (visible plus in flight) one minion should take, at least 1",
        )
    })?;
    let config = SqsSignalConfig {
        queue_url,
        region: raw.region,
        endpoint_url: raw.endpoint_url,
        target_per_minion,
        activation: raw.activation.unwrap_or(0),
    };
    config
        .validate()
        .map_err(|e| v.invalid(&key(&format!("sqs.{}", e.key())), e.to_string()))?;
    Ok(config)
}

struct Validator<'a> {
    file: &'a Path,
}

impl Validator<'_> {
    fn invalid(&self, key: &str, expected: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_owned(),
            key: key.to_owned(),
            expected: expected.into(),
        }
    }

    fn addr(&self, key: &str, s: &str) -> Result<SocketAddr, ConfigError> {
        s.parse()
            .map_err(|_| self.invalid(key, format!("an address like 127.0.0.1:7070, got {s:?}")))
    }

    fn positive(&self, key: &str, d: Duration) -> Result<Duration, ConfigError> {
        if d.is_zero() {
            return Err(self.invalid(key, "a duration above zero, like \"1s\""));
        }
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        listen = "127.0.0.1:0"
        join_token_file = "token"
        [tls]
        cert = "server.pem"
        key = "server.key"
        client_ca = "/abs/ca.pem"
        [[fleet]]
        name = "local"
        provider = "local"
        min = 1
        max = 5
        scale_in_stabilization = "30s"
        target_latency = "20s"
        [[fleet.schedule]]
        name = "nights"
        timezone = "America/Detroit"
        days = "mon-fri"
        from = "19:00"
        to = "07:00"
        max = 3
        [fleet.local]
        listen = "127.0.0.1:2575"
        minion_config = "minion.toml"
    "#;

    fn parse(text: &str) -> Result<ControllerConfig, ConfigError> {
        ControllerConfig::parse(Path::new("/etc/gru/controller.toml"), text)
    }

    #[test]
    fn the_minion_ca_defaults_to_the_state_dir_and_bad_settings_name_their_key() {
        let c = parse(GOOD).expect("good");
        assert_eq!(c.minion_ca.cert, c.state_dir.join("minion-ca.pem"));
        assert_eq!(c.minion_ca.key, c.state_dir.join("minion-ca.key"));
        assert_eq!(c.minion_ca.lifetime, DEFAULT_MINION_CERT_LIFETIME);
        assert_eq!(c.tls.minion_ca.as_ref(), Some(&c.minion_ca.cert));
        let with = |t: &str| GOOD.replace("[[fleet]]", &format!("{t}\n[[fleet]]"));
        let c = parse(&with(
            "[minion_ca]\ncert = \"/etc/gru/minion-ca.pem\"\nkey = \"/etc/gru/minion-ca.key\"\nlifetime = \"6h\"",
        ))
        .expect("minion_ca");
        assert_eq!(c.minion_ca.cert, PathBuf::from("/etc/gru/minion-ca.pem"));
        assert_eq!(c.minion_ca.lifetime, Duration::from_secs(6 * 3600));
        let err = |t: &str| parse(&with(t)).expect_err(t).to_string();
        assert_eq!(
            err("[minion_ca]\ncert = \"/etc/gru/minion-ca.pem\""),
            "/etc/gru/controller.toml: minion_ca: both cert and key, or neither (then the controller keeps its own in state_dir)"
        );
        assert_eq!(
            err("[minion_ca]\nlifetime = \"0s\""),
            "/etc/gru/controller.toml: minion_ca.lifetime: a duration of at least 1s, like \"24h\""
        );
    }

    #[test]
    fn identity_joins_need_accounts_and_a_signer_for_the_fleets_region() {
        assert_eq!(parse(GOOD).expect("good").fleets[0].identity, None);
        let with = |fleet: &str, top: &str| {
            GOOD.replacen("[[fleet]]", &format!("{top}\n[[fleet]]"), 1) + fleet
        };
        let signer =
            "[[identity_signer]]\nregion = \"eu-west-1\"\ncert = \"/etc/gru/aws-eu-west-1.pem\"";
        let c = parse(&with(
            "\n[fleet.identity]\naccounts = [\"123456789012\"]\nregion = \"eu-west-1\"\n",
            signer,
        ))
        .expect("identity");
        let rules = c.fleets[0].identity.clone().expect("rules");
        assert_eq!(c.join_token_file, Some(PathBuf::from("/etc/gru/token")));
        // Every fleet joins with documents: no token needed.
        let c = parse(
            &with(
                "\n[fleet.identity]\naccounts = [\"123456789012\"]\nregion = \"eu-west-1\"\n",
                signer,
            )
            .replace("join_token_file = \"token\"", ""),
        )
        .expect("no token");
        assert_eq!(c.join_token_file, None);
        assert_eq!(rules.accounts, ["123456789012"]);
        assert_eq!(rules.max_age, crate::identity::DEFAULT_MAX_AGE);
        assert_eq!(
            c.identity_signers,
            [IdentitySigner {
                region: "eu-west-1".into(),
                cert: "/etc/gru/aws-eu-west-1.pem".into()
            }]
        );
        let err = |fleet: &str, top: &str| parse(&with(fleet, top)).expect_err(fleet).to_string();
        assert_eq!(
            err(
                "\n[fleet.identity]\naccounts = [\"123456789012\"]\nregion = \"xx-test-1\"\n",
                signer
            ),
            "/etc/gru/controller.toml: fleet[0].identity.region: a region whose certificate gru ships, or one with an [[identity_signer]] (AWS's certificate for it), got \"xx-test-1\""
        );
        // A region gru ships AWS's certificate for needs no signer.
        assert!(
            parse(&with(
                "\n[fleet.identity]\naccounts = [\"123456789012\"]\nregion = \"us-east-2\"\n",
                "",
            ))
            .is_ok()
        );
        assert!(
            err(
                "\n[fleet.identity]\naccounts = [\"12345\"]\nregion = \"eu-west-1\"\n",
                signer
            )
            .contains("fleet[0].identity.accounts: the AWS account ids (12 digits each)")
        );
        assert!(
            err(
                "\n[fleet.identity]\naccounts = [\"123456789012\"]\n",
                signer
            )
            .contains("fleet[0].identity.region")
        );
        assert!(
            err("", "[[identity_signer]]\nregion = \"eu-west-1\"")
                .contains("identity_signer[0]: a region and the path")
        );
    }

    #[test]
    fn access_rules_are_read_in_order_and_bad_ones_name_their_key() {
        assert_eq!(parse(GOOD).expect("good").access, Access::default());
        let with = |access: &str| GOOD.replace("[[fleet]]", &format!("{access}\n[[fleet]]"));
        let c = parse(&with(
            r#"[access]
            default_role = "viewer"
            [[access.rule]]
            common_name = "bob"
            role = "operator"
            [[access.rule]]
            organizational_unit = "sre"
            common_name = "carol"
            role = "admin""#,
        ))
        .expect("access");
        assert_eq!(c.access.default_role, Some(Role::Viewer));
        assert_eq!(
            c.access.rules,
            vec![
                AccessRule {
                    common_name: Some("bob".into()),
                    organizational_unit: None,
                    role: Role::Operator
                },
                AccessRule {
                    common_name: Some("carol".into()),
                    organizational_unit: Some("sre".into()),
                    role: Role::Admin
                },
            ]
        );
        let err = |access: &str| parse(&with(access)).expect_err(access).to_string();
        assert_eq!(
            err("[access]\n[[access.rule]]\ncommon_name = \"bob\"\nrole = \"root\""),
            "/etc/gru/controller.toml: access.rule[0].role: one of \"viewer\", \"operator\", \"admin\", got \"root\""
        );
        assert_eq!(
            err("[access]\n[[access.rule]]\nrole = \"viewer\""),
            "/etc/gru/controller.toml: access.rule[0]: common_name or organizational_unit (or both) to match a certificate's subject"
        );
        assert_eq!(
            err("[access]\ndefault_role = \"everyone\""),
            "/etc/gru/controller.toml: access.default_role: one of \"none\", \"viewer\", \"operator\", \"admin\", got \"everyone\""
        );
        assert_eq!(
            parse(&with("[access]\ndefault_role = \"none\""))
                .expect("none")
                .access,
            Access {
                rules: vec![],
                default_role: None
            }
        );
    }

    fn err(text: &str) -> String {
        parse(text).expect_err("must be refused").to_string()
    }

    #[test]
    fn good_config_gets_defaults_and_resolved_paths() {
        let c = parse(GOOD).expect("valid");
        assert_eq!(c.report_interval, DEFAULT_REPORT_INTERVAL);
        assert_eq!(c.tls.cert, PathBuf::from("/etc/gru/server.pem"));
        assert_eq!(c.tls.client_ca, PathBuf::from("/abs/ca.pem"));
        let f = &c.fleets[0];
        assert_eq!((f.bounds().min, f.bounds().max), (1, 5));
        assert_eq!(
            f.policy.behaviour().scale_in_stabilization,
            Duration::from_secs(30)
        );
        assert_eq!(f.policy.rules().len(), 2, "queue depth and latency");
        assert_eq!(f.policy.schedules()[0].name(), "nights");
        let ProviderConfig::Local(l) = &f.provider else {
            panic!("a local fleet")
        };
        assert_eq!(l.minion_config, PathBuf::from("/etc/gru/minion.toml"));
        assert_eq!(l.deregistration_delay, DEFAULT_DEREGISTRATION_DELAY);
    }

    #[test]
    fn errors_name_file_key_and_expectation() {
        assert_eq!(
            err(&GOOD.replace("max = 5", "max = 0")),
            "/etc/gru/controller.toml: fleet[0].max: min (1) must not be greater than max (0)"
        );
        assert_eq!(
            err(&GOOD.replace("provider = \"local\"", "provider = \"gcp\"")),
            "/etc/gru/controller.toml: fleet[0].provider: \"local\" or \"aws\", got \"gcp\""
        );
        assert_eq!(
            err(&GOOD.replace("listen = \"127.0.0.1:0\"", "listen = \"nowhere\"")),
            "/etc/gru/controller.toml: listen: an address like 127.0.0.1:7070, got \"nowhere\""
        );
        assert!(err(&GOOD.replace("[tls]", "[tlz]")).starts_with("/etc/gru/controller.toml: "));
        assert_eq!(
            err(&format!("lost_timeout = \"1s\"\n{GOOD}")),
            "/etc/gru/controller.toml: lost_timeout: at least twice report_interval (1s), got 1s"
        );
    }

    #[test]
    fn a_dynamodb_store_needs_a_table_a_region_and_a_shared_minion_ca() {
        assert_eq!(parse(GOOD).expect("valid").store, StoreConfig::Sqlite);
        let ca =
            "[minion_ca]\ncert = \"/etc/gru/minion-ca.pem\"\nkey = \"/etc/gru/minion-ca.key\"\n";
        let store = "[store]\nkind = \"dynamodb\"\ntable = \"gru-state\"\nregion = \"eu-west-1\"\nname = \"ctl-a\"\n";
        let c = parse(&format!("{GOOD}{store}{ca}")).expect("valid");
        let StoreConfig::Dynamodb(d) = &c.store else {
            panic!("not dynamodb: {:?}", c.store)
        };
        assert_eq!(
            (d.table.as_str(), d.region.as_str()),
            ("gru-state", "eu-west-1")
        );
        assert_eq!(d.endpoint_url, None);
        assert_eq!(d.leader.name, "ctl-a");
        assert_eq!(
            (d.leader.lease, d.leader.heartbeat),
            (DEFAULT_LEASE, DEFAULT_HEARTBEAT)
        );
        // The default address is this host's, on the listen port.
        assert!(
            d.leader.advertise.starts_with("https://")
                && d.leader
                    .advertise
                    .ends_with(&format!(":{}", c.listen.port())),
            "{}",
            d.leader.advertise
        );
        assert_eq!(
            err(&format!("{GOOD}{store}")),
            "/etc/gru/controller.toml: minion_ca: cert and key that every controller sharing the table reads (with kind = \"dynamodb\", a minion's certificate must be valid at whichever controller leads)"
        );
        assert_eq!(
            err(&format!(
                "{GOOD}{}{ca}",
                store.replace("table = \"gru-state\"\n", "")
            )),
            "/etc/gru/controller.toml: store.table: the DynamoDB table's name (3 to 255 of a-z, A-Z, 0-9, _ . -), like \"gru-state\""
        );
        assert!(
            err(&format!(
                "{GOOD}{}{ca}",
                store.replace("region = \"eu-west-1\"\n", "")
            ))
            .contains("store.region: the region the table is in")
        );
        assert_eq!(
            err(&format!(
                "{GOOD}{store}lease = \"6s\"\nheartbeat = \"3s\"\n{ca}"
            )),
            "/etc/gru/controller.toml: store.heartbeat: a duration above 0 and at most a third of the lease (6s), so a renewal can be lost without losing the lease"
        );
        assert!(
            err(&format!("{GOOD}{store}advertise = \"10.0.0.5:7070\"\n{ca}"))
                .contains("store.advertise: the https:// address")
        );
        assert_eq!(
            err(&format!("{GOOD}[store]\nkind = \"etcd\"\n")),
            "/etc/gru/controller.toml: store.kind: \"sqlite\" (the default) or \"dynamodb\", got \"etcd\""
        );
        assert_eq!(
            err(&format!("{GOOD}[store]\ntable = \"gru-state\"\n")),
            "/etc/gru/controller.toml: store.table: nothing: it is a setting of kind = \"dynamodb\" (the SQLite store lives in state_dir)"
        );
    }

    #[test]
    fn an_sqs_queue_adds_an_external_rule_and_its_errors_name_the_key() {
        let sqs = "[fleet.sqs]\nqueue_url = \"https://sqs.eu-west-1.amazonaws.com/123456789012/hl7\"\ntarget_per_minion = 500\n";
        let c = parse(&format!("{GOOD}{sqs}")).expect("valid");
        let f = &c.fleets[0];
        let q = f.sqs.as_ref().expect("sqs");
        assert_eq!((q.target_per_minion, q.activation), (500, 0));
        assert_eq!(
            f.policy.rules().last(),
            Some(&Rule::External {
                signal: "sqs".to_owned(),
                target_per_minion: 500,
                activation: 0,
            })
        );
        assert_eq!(
            err(&format!("{GOOD}{}", sqs.replace("500", "0"))),
            "/etc/gru/controller.toml: fleet[0].sqs.target_per_minion: at least 1"
        );
        assert_eq!(
            err(&format!(
                "{GOOD}{}",
                sqs.replace(
                    "https://sqs.eu-west-1.amazonaws.com",
                    "http://127.0.0.1:5000"
                )
            )),
            "/etc/gru/controller.toml: fleet[0].sqs.region: needed: the queue URL \"http://127.0.0.1:5000/123456789012/hl7\" does not name a region"
        );
        assert!(
            err(&format!("{GOOD}[fleet.sqs]\ntarget_per_minion = 5\n"))
                .starts_with("/etc/gru/controller.toml: fleet[0].sqs.queue_url: the queue's URL"),
        );
        assert!(err(&format!("{GOOD}{sqs}visibility = 3\n")).contains("visibility"));
    }

    #[test]
    fn unknown_keys_and_bad_durations_are_refused_with_their_key() {
        let e = err(&GOOD.replace("min = 1", "minimum = 1"));
        assert!(e.contains("minimum"), "{e}");
        let e = err(&GOOD.replace("\"30s\"", "\"soon\""));
        assert!(e.contains("scale_in_stabilization"), "{e}");
    }

    #[test]
    fn schedule_and_policy_errors_name_their_key() {
        let e = err(&GOOD.replace("America/Detroit", "Mars/Olympus"));
        assert_eq!(
            e,
            "/etc/gru/controller.toml: fleet[0].schedule[0].timezone: unknown time zone `Mars/Olympus`"
        );
        let e = err(&GOOD.replace("\"19:00\"", "\"7pm\""));
        assert!(
            e.starts_with("/etc/gru/controller.toml: fleet[0].schedule[0].from: "),
            "{e}"
        );
        let e = err(&GOOD.replace("max = 3", "max = 3\n        min = 4"));
        assert_eq!(
            e,
            "/etc/gru/controller.toml: fleet[0].schedule[0].min: min (4) must not be greater than max (3)"
        );
        let e = err(&GOOD.replace("target_latency = \"20s\"", "tolerance = 1.5"));
        assert!(
            e.starts_with("/etc/gru/controller.toml: fleet[0].tolerance: "),
            "{e}"
        );
        let e = err(&GOOD.replace(
            "target_latency = \"20s\"",
            "service_rate = -3.0\n[fleet.forecast]\nmode = \"always\"",
        ));
        assert_eq!(
            e,
            "/etc/gru/controller.toml: fleet[0].forecast.mode: \"off\", \"forecast_only\" or \"on\", got \"always\""
        );
        let e = err(&GOOD.replace("target_latency = \"20s\"", "target_utilization = 1.5"));
        assert_eq!(
            e,
            "/etc/gru/controller.toml: fleet[0].target_utilization: utilization 1.5 is not in (0, 1]"
        );
        let e = err(&GOOD.replace("target_latency = \"20s\"", "service_rate = 0.0"));
        assert_eq!(
            e,
            "/etc/gru/controller.toml: fleet[0].service_rate: service rate 0 is not a number of messages per second above 0"
        );
        let e = err(&GOOD.replace("days = \"mon-fri\"", "start = \"0 19 * * 1-5\""));
        assert!(
            e.starts_with("/etc/gru/controller.toml: fleet[0].schedule[0].days: either"),
            "{e}"
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let text = GOOD
            .replace("listen = \"127.0.0.1:0\"", "listen = \"nowhere\"")
            .replace("max = 5", "max = 0")
            .replace("join_token_file = \"token\"", "");
        let e = err(&text);
        assert!(e.starts_with("3 problems:\n"), "{e}");
        for key in ["listen", "join_token_file", "fleet[0].max"] {
            assert!(
                e.contains(&format!("/etc/gru/controller.toml: {key}: ")),
                "{key} missing in {e}"
            );
        }
    }

    #[test]
    fn duplicate_fleet_names_are_refused() {
        let twice = format!(
            "{GOOD}\n{}",
            &GOOD[GOOD.find("[[fleet]]").expect("has fleet")..]
        );
        assert_eq!(
            err(&twice),
            "/etc/gru/controller.toml: fleet[1].name: a unique name, \"local\" is used twice"
        );
    }

    /// The shipped example does what its comments say, at chosen moments in
    /// America/Detroit, across a DST change.
    #[test]
    fn the_shipped_schedule_example_follows_detroit_office_hours() {
        use gru_core::policy::{MinionLoad, Observation, Overrides, PolicyState, evaluate};
        let file =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/schedules.example.toml");
        let config = ControllerConfig::load(&file).expect("the example is valid");
        let fleet = |name: &str| {
            config
                .fleets
                .iter()
                .find(|f| f.name == name)
                .expect("fleet")
                .clone()
        };
        // Desired under heavy load (from 5) and when idle (from 1), at `at` (UTC).
        let desired = |fleet: &FleetConfig, at: &str| {
            let now: jiff::Timestamp = at.parse().expect("timestamp");
            let busy = Observation {
                capacity: 5,
                minions: vec![
                    MinionLoad {
                        queued: 500,
                        in_flight: 4,
                        rate_per_s: None
                    };
                    5
                ],
                external: Vec::new(),
            };
            // Idle with one minion, so no step limit hides the minimum.
            let idle = Observation {
                capacity: 1,
                minions: vec![MinionLoad::default()],
                external: Vec::new(),
            };
            let run = |obs: &Observation| {
                evaluate(
                    &fleet.policy,
                    &mut PolicyState::new(),
                    obs,
                    &Overrides::default(),
                    now,
                )
                .desired
            };
            (run(&busy), run(&idle))
        };
        let (prod, cert, dev) = (fleet("prod"), fleet("cert"), fleet("dev"));
        // Tuesday 2026-11-24 22:00 EST: weeknight, at most 3.
        assert_eq!(desired(&prod, "2026-11-25T03:00:00Z").0, 3);
        // Wednesday 14:00 EST: the fleet's own max.
        assert_eq!(desired(&prod, "2026-11-25T19:00:00Z").0, 12);
        // Saturday 2026-11-28 03:00 EST: weekend outranks the Friday night window.
        assert_eq!(desired(&prod, "2026-11-28T08:00:00Z"), (2, 1));
        assert_eq!(desired(&prod, "2026-11-28T17:00:00Z"), (2, 1));
        // cert: Monday 06:00 EST off, 10:00 on (min 1), Sunday noon off.
        assert_eq!(desired(&cert, "2026-11-23T11:00:00Z"), (0, 0));
        assert_eq!(desired(&cert, "2026-11-23T15:00:00Z"), (2, 1));
        assert_eq!(desired(&cert, "2026-11-29T17:00:00Z"), (0, 0));
        // dev across spring-forward (Sunday 2027-03-14): Monday 06:59 EDT is
        // still off, 07:00 EDT (11:00Z, no longer 12:00Z) is on.
        assert_eq!(desired(&dev, "2027-03-15T10:59:00Z"), (0, 0));
        assert_eq!(desired(&dev, "2027-03-15T11:00:00Z"), (2, 1));
    }

    const AWS: &str = r#"
        join_token_file = "token"
        [tls]
        cert = "server.pem"
        key = "server.key"
        client_ca = "ca.pem"
        [[fleet]]
        name = "hl7"
        provider = "aws"
        min = 1
        max = 8
        [fleet.aws]
        region = "eu-west-1"
        group_name = "gru-hl7"
        target_group_arn = "arn:aws:elasticloadbalancing:eu-west-1:123456789012:targetgroup/hl7/0123456789abcdef"
        launching_hook = "gru-launching"
        terminating_hook = "gru-terminating"
    "#;

    #[test]
    fn an_aws_fleet_reads_its_group_target_group_and_hooks() {
        let c = parse(AWS).expect("valid");
        let f = &c.fleets[0];
        assert_eq!(f.provider.name(), "aws");
        let a = f.provider.aws().expect("aws");
        assert_eq!(a.fleet.group_name, "gru-hl7");
        assert_eq!(a.fleet.region.as_deref(), Some("eu-west-1"));
        assert_eq!(a.fleet.launching_hook.as_deref(), Some("gru-launching"));
        assert_eq!(a.fleet.terminating_hook.as_deref(), Some("gru-terminating"));
        assert_eq!(a.fleet.max_attempts, gru_cloud::aws::DEFAULT_MAX_ATTEMPTS);
        assert_eq!(a.fleet.endpoint_url, None);
        assert_eq!(a.heartbeat_interval, DEFAULT_LIFECYCLE_HEARTBEAT_INTERVAL);

        let c = parse(&AWS.replace(
            "terminating_hook = \"gru-terminating\"",
            "max_attempts = 5\nendpoint_url = \"http://127.0.0.1:5000\"\nheartbeat_interval = \"10s\"",
        ))
        .expect("valid");
        let a = c.fleets[0].provider.aws().expect("aws");
        assert_eq!(a.fleet.max_attempts, 5);
        assert_eq!(a.fleet.terminating_hook, None);
        assert_eq!(
            a.fleet.endpoint_url.as_deref(),
            Some("http://127.0.0.1:5000")
        );
        assert_eq!(a.heartbeat_interval, Duration::from_secs(10));
    }

    #[test]
    fn aws_errors_name_their_key() {
        let file = "/etc/gru/controller.toml";
        assert_eq!(
            err(&AWS.replace("group_name = \"gru-hl7\"", "")),
            format!("{file}: fleet[0].aws.group_name: the Auto Scaling group's name")
        );
        assert_eq!(
            err(&AWS.replace("\"gru-hl7\"", "\" \"")),
            format!("{file}: fleet[0].aws.group_name: group_name must not be empty")
        );
        let e = err(&AWS.replace("targetgroup/hl7", "loadbalancer/hl7"));
        assert!(
            e.starts_with(&format!("{file}: fleet[0].aws.target_group_arn: ")),
            "{e}"
        );
        let e = err(&AWS.replace("region = \"eu-west-1\"", "region = \"us-east-1\""));
        assert!(
            e.starts_with(&format!("{file}: fleet[0].aws.region: ")),
            "{e}"
        );
        let e = err(&AWS.replace("\"gru-launching\"", "\"\""));
        assert!(
            e.starts_with(&format!("{file}: fleet[0].aws.launching_hook: ")),
            "{e}"
        );
        let e = err(&AWS.replace("group_name =", "max_attempts = 0\ngroup_name ="));
        assert!(
            e.starts_with(&format!("{file}: fleet[0].aws.max_attempts: ")),
            "{e}"
        );
        let e = err(&AWS.replace("group_name =", "heartbeat_interval = \"0s\"\ngroup_name ="));
        assert!(
            e.starts_with(&format!("{file}: fleet[0].aws.heartbeat_interval: ")),
            "{e}"
        );
        let e = err(&AWS.replace("group_name =", "groupname = \"x\"\ngroup_name ="));
        assert!(e.contains("groupname"), "{e}");
        assert_eq!(
            err(&AWS[..AWS.find("[fleet.aws]").expect("table")]),
            format!("{file}: fleet[0].aws: a [fleet.aws] table for provider \"aws\"")
        );
        assert_eq!(
            err(&AWS.replace("provider = \"aws\"", "provider = \"local\"")),
            format!("{file}: fleet[0].aws: no [fleet.aws] table for provider \"local\"")
        );
    }
}
