//! The controller on AWS, against moto (module `gru_aws::testing`): a real
//! `gru controller` process whose fleet is an Auto Scaling group, and a real
//! `gru minion` process per instance the group launches, started by this
//! test as the instance's cloud-init would (its instance id given with
//! `--instance-id`: moto's instance metadata lacks what the SDK needs), or,
//! joining with identity documents, from an instance-metadata stub per
//! minion serving its signed document.
//!
//! This test has a moto server of its own: the controller's clients come
//! from the SDK's default chain and send no `x-moto-account-id`, so they
//! are in moto's default account, which no other test may share.
//! Credentials are dummies in the controller's environment; IMDS is off so
//! the chain never reaches 169.254.169.254.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use gru_aws::testing::{self, DEFAULT_ACCOUNT, MotoServer, NoInterceptor};
use gru_aws::{AwsClients, AwsFleet, AwsFleetConfig, AwsLifecycle, LifecycleHook};
use serde_json::Value;

use crate::harness::{GRU, Proc, Sink, wait_until};

const FLEET: &str = "prod";
const TOKEN: &str = "e2e-aws-join-token";
/// Bound on each wait: moto's first EC2 calls take seconds, then joins,
/// drains and a few reconcile passes.
const WAIT: Duration = Duration::from_secs(60);
const LAUNCHING_HOOK: &str = "gru-launching";
const TERMINATING_HOOK: &str = "gru-terminating";

/// How the cluster is set up: the lifecycle hooks put on the group and
/// named in the controller's `[fleet.aws]` (moto stores them; the harness's
/// layer holds instances), and whether minions join with identity documents.
#[derive(Clone, Copy, Default)]
struct Setup {
    launching: bool,
    terminating: bool,
    /// `[fleet.identity]`: each minion reads a signed identity document
    /// from an instance-metadata stub of its own (moto serves none per
    /// instance), signed by an openssl key standing in for AWS's; no join
    /// token anywhere in the minions' config.
    identity: bool,
    /// Two controllers on a DynamoDB table in moto (`[store] kind =
    /// "dynamodb"`), one leading: `controller` is started first and leads,
    /// `standby` waits. They share the minion CA; minions and the
    /// operator's client know both addresses.
    ha: bool,
}

/// The lease in the HA set-up: short, so a failover takes seconds.
const HA_LEASE: &str = "2s";
const HA_HEARTBEAT: &str = "500ms";
const HA_TABLE: &str = "gru-state";

/// Everything the scenario runs, stopped when dropped.
struct Cluster {
    rt: tokio::runtime::Runtime,
    clients: AwsClients,
    fleet: AwsFleet,
    target_group_arn: String,
    controller: Proc,
    /// With [`Setup::ha`]: the second controller (config
    /// `controller-b.toml`, log `controller-b.log`).
    standby: Option<Proc>,
    /// `https://127.0.0.1:PORT`, for minions and the operator's client;
    /// with [`Setup::ha`], the first controller's.
    url: String,
    /// With [`Setup::ha`]: the second controller's address.
    url_b: Option<String>,
    /// With [`Setup::ha`]: the two controllers' metrics addresses.
    metrics: Option<(String, String)>,
    ca: PathBuf,
    /// With [`Setup::identity`]: the stand-in signer's key.
    signer_key: Option<PathBuf>,
    /// Instance-metadata stubs, one per minion, stopped when dropped.
    imds: std::sync::Mutex<Vec<ImdsStub>>,
    dir: tempfile::TempDir,
    // Dropped last: the processes above talk to it.
    _moto: MotoServer,
}

/// `gru controller` on the cluster's config in `dir`, logging (appending)
/// to `controller.log`.
fn spawn_controller(dir: &std::path::Path) -> Proc {
    spawn_named_controller(dir, "controller")
}

/// `gru controller` on `dir/NAME.toml`, logging (appending) to
/// `dir/NAME.log`.
fn spawn_named_controller(dir: &std::path::Path, name: &str) -> Proc {
    let config = dir.join(format!("{name}.toml"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.log")))
        .expect("log file");
    let mut cmd = Command::new(GRU);
    cmd.args(["controller", "--config"])
        .arg(&config)
        // The SDK's default chain: environment credentials (moto takes
        // any), no shared files, no instance metadata.
        .env("AWS_ACCESS_KEY_ID", "moto")
        .env("AWS_SECRET_ACCESS_KEY", "moto")
        .env("AWS_REGION", testing::REGION)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", dir.join("no-aws-config"))
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            dir.join("no-aws-credentials"),
        )
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_SESSION_TOKEN")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    Proc::spawn("gru controller", &mut cmd)
}

impl Cluster {
    fn start() -> Cluster {
        Cluster::start_with(Setup::default())
    }

    fn start_with(hooks: Setup) -> Cluster {
        let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
        let moto = MotoServer::start();
        let clients = testing::clients(&moto.url, DEFAULT_ACCOUNT, NoInterceptor);
        let made = rt.block_on(testing::create_fleet(&clients, 0, 3, 0));
        let fleet = AwsFleet::from_clients(
            AwsFleetConfig::new(&made.group, &made.target_group_arn),
            clients.clone(),
        );
        let mut hook_keys = String::new();
        for (on, key, name, transition) in [
            (
                hooks.launching,
                "launching_hook",
                LAUNCHING_HOOK,
                "autoscaling:EC2_INSTANCE_LAUNCHING",
            ),
            (
                hooks.terminating,
                "terminating_hook",
                TERMINATING_HOOK,
                "autoscaling:EC2_INSTANCE_TERMINATING",
            ),
        ] {
            if !on {
                continue;
            }
            rt.block_on(
                clients
                    .autoscaling
                    .put_lifecycle_hook()
                    .auto_scaling_group_name(&made.group)
                    .lifecycle_hook_name(name)
                    .lifecycle_transition(transition)
                    .heartbeat_timeout(300)
                    .default_result("ABANDON")
                    .send(),
            )
            .expect("PutLifecycleHook");
            hook_keys.push_str(&format!("{key} = \"{name}\"\n"));
        }

        let dir = tempfile::tempdir().expect("tempdir");
        let (signer_key, identity_keys) = if hooks.identity {
            let (key, cert) = (dir.path().join("signer.key"), dir.path().join("signer.pem"));
            openssl(
                Command::new("openssl")
                    .args([
                        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    ])
                    .args([
                        "-subj",
                        "/CN=test stand-in for AWS's identity document signer",
                    ])
                    .arg("-keyout")
                    .arg(&key)
                    .arg("-out")
                    .arg(&cert),
            );
            let keys = format!(
                "[fleet.identity]\naccounts = [\"{DEFAULT_ACCOUNT}\"]\nregion = \"{}\"\n\
                 [[identity_signer]]\nregion = \"{}\"\ncert = {:?}\n",
                testing::REGION,
                testing::REGION,
                cert.display().to_string()
            );
            (Some(key), keys)
        } else {
            (None, String::new())
        };
        let pki = gru_controller::pki::DevPki::in_dir(dir.path());
        pki.ensure().expect("dev pki");
        let token = dir.path().join("token");
        std::fs::write(&token, TOKEN).expect("token");
        // A port that was free a moment ago: the controller's config needs
        // its address before it starts, and the minions need it too.
        let port = testing::free_port();
        let port_b = testing::free_port();
        // With two controllers: the table in moto (the controllers' default
        // account), a minion CA both issue from, and each its own name.
        let metrics_ports = (testing::free_port(), testing::free_port());
        let ha_keys = |name: &str, port: u16| -> String {
            if !hooks.ha {
                return String::new();
            }
            format!(
                "[store]\nkind = \"dynamodb\"\ntable = \"{HA_TABLE}\"\nregion = \"{}\"\n\
                 endpoint_url = \"{}\"\nname = \"{name}\"\nadvertise = \"https://127.0.0.1:{port}\"\n\
                 lease = \"{HA_LEASE}\"\nheartbeat = \"{HA_HEARTBEAT}\"\n\
                 [minion_ca]\ncert = {:?}\nkey = {:?}\n",
                testing::REGION,
                moto.url,
                dir.path().join("minion-ca.pem").display().to_string(),
                dir.path().join("minion-ca.key").display().to_string(),
            )
        };
        if hooks.ha {
            let dynamodb = testing::dynamodb_client(&moto.url, DEFAULT_ACCOUNT);
            rt.block_on(gru_aws::dynamo::create_table(&dynamodb, HA_TABLE))
                .expect("CreateTable");
            gru_controller::pki::Ca::load_or_create(
                &dir.path().join("minion-ca.pem"),
                &dir.path().join("minion-ca.key"),
                "e2e: minion CA shared by both controllers",
            )
            .expect("minion CA");
        }
        let names: &[(&str, u16, &str)] = if hooks.ha {
            &[
                ("controller", port, "ctl-a"),
                ("controller-b", port_b, "ctl-b"),
            ]
        } else {
            &[("controller", port, "ctl-a")]
        };
        for &(file, port, name) in names {
            let config = dir.path().join(format!("{file}.toml"));
            let state = dir.path().join(format!("{file}-state"));
            std::fs::write(
                &config,
                format!(
                    r#"
listen = "127.0.0.1:{port}"
{metrics_line}
report_interval = "200ms"
lost_timeout = "5s"
eval_interval = "200ms"
join_timeout = "60s"
{token_line}state_dir = {state:?}
[tls]
cert = {cert:?}
key = {key:?}
client_ca = {ca:?}
[[fleet]]
name = "{FLEET}"
provider = "aws"
min = 0
max = 3
max_step_in = 3
[fleet.aws]
group_name = {group:?}
target_group_arn = {arn:?}
endpoint_url = {url:?}
max_attempts = 1
heartbeat_interval = "500ms"
{hook_keys}{identity}{ha}"#,
                    ha = ha_keys(name, port),
                    metrics_line = if hooks.ha {
                        let m = if file == "controller" {
                            metrics_ports.0
                        } else {
                            metrics_ports.1
                        };
                        format!("metrics_listen = \"127.0.0.1:{m}\"\n")
                    } else {
                        String::new()
                    },
                    // With identity documents, no join token anywhere.
                    token_line = if hooks.identity {
                        String::new()
                    } else {
                        format!("join_token_file = {:?}\n", token.display().to_string())
                    },
                    identity = identity_keys,
                    state = state.display().to_string(),
                    cert = pki.server_cert.display().to_string(),
                    key = pki.server_key.display().to_string(),
                    ca = pki.ca_cert.display().to_string(),
                    group = made.group,
                    arn = made.target_group_arn,
                    url = moto.url,
                ),
            )
            .expect("write controller.toml");
        }
        let client = |controller: String| {
            format!(
                "controller = {controller}\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n",
                pki.ca_cert.display().to_string(),
                pki.admin_cert.display().to_string(),
                pki.admin_key.display().to_string(),
            )
        };
        let (a, b) = (
            format!("https://127.0.0.1:{port}"),
            format!("https://127.0.0.1:{port_b}"),
        );
        let both = if hooks.ha {
            format!("[{a:?}, {b:?}]")
        } else {
            format!("{a:?}")
        };
        std::fs::write(dir.path().join("client.toml"), client(both)).expect("client.toml");
        // Each controller alone, for what one of them says.
        std::fs::write(dir.path().join("client-a.toml"), client(format!("{a:?}")))
            .expect("client-a.toml");
        std::fs::write(dir.path().join("client-b.toml"), client(format!("{b:?}")))
            .expect("client-b.toml");

        let controller = spawn_controller(dir.path());
        let mut cluster = Cluster {
            rt,
            clients,
            fleet,
            target_group_arn: made.target_group_arn,
            controller,
            standby: None,
            url: format!("https://127.0.0.1:{port}"),
            url_b: hooks.ha.then(|| format!("https://127.0.0.1:{port_b}")),
            metrics: hooks.ha.then(|| {
                (
                    format!("127.0.0.1:{}", metrics_ports.0),
                    format!("127.0.0.1:{}", metrics_ports.1),
                )
            }),
            ca: pki.ca_cert.clone(),
            signer_key,
            imds: Default::default(),
            dir,
            _moto: moto,
        };
        wait_until("the controller to answer", WAIT, || {
            if let Some(status) = cluster.controller.child.try_wait().expect("wait") {
                panic!(
                    "gru controller exited with {status}:\n{}",
                    cluster.log("controller.log")
                );
            }
            cluster.gru(&["fleet", "ls"]).status.success().then_some(())
        });
        if hooks.ha {
            // The second controller once the first leads: it stands by.
            cluster.standby = Some(spawn_named_controller(cluster.dir.path(), "controller-b"));
            cluster.wait_for_standby("controller-b");
        }
        cluster
    }

    /// SIGKILLs the controller, as a crash would, and starts it again on
    /// the same config, state directory and port; waits until it answers.
    fn restart_controller(&mut self) {
        self.controller.child.kill().expect("kill the controller");
        let _ = self.controller.child.wait();
        self.controller = spawn_controller(self.dir.path());
        wait_until("the restarted controller to answer", WAIT, || {
            if let Some(status) = self.controller.child.try_wait().expect("wait") {
                panic!(
                    "gru controller exited with {status}:\n{}",
                    self.log("controller.log")
                );
            }
            self.gru(&["fleet", "ls"]).status.success().then_some(())
        });
    }

    /// Runs `gru ARGS` with client config `client` (`client-a.toml`: the
    /// first controller only).
    fn gru_with(&self, client: &str, args: &[&str]) -> Output {
        Command::new(GRU)
            .args(args)
            .env("GRU_CONFIG", self.dir.path().join(client))
            .stdin(Stdio::null())
            .output()
            .expect("run gru")
    }

    /// [`wait_until`], with every process's log in the message on timeout.
    fn wait<T>(&self, what: &str, deadline: Duration, f: impl FnMut() -> Option<T>) -> T {
        crate::harness::wait_until_or(what, deadline, f, || self.logs())
    }

    /// Two controllers on one table, the first leading ([`Setup::ha`]).
    fn start_ha() -> Cluster {
        Cluster::start_with(Setup {
            ha: true,
            ..Setup::default()
        })
    }

    /// Starts the first controller again (after it was killed or stepped
    /// down) and waits until it stands by.
    fn restart_first_as_standby(&mut self) {
        self.controller = spawn_named_controller(self.dir.path(), "controller");
        self.wait_for_standby("controller");
    }

    /// Waits until the controller `client` (`client-b.toml`) names answers
    /// as the leader.
    fn wait_to_lead(&self, client: &str) {
        self.wait(&format!("the controller of {client} to lead"), WAIT, || {
            self.gru_with(client, &["fleet", "ls"])
                .status
                .success()
                .then_some(())
        });
    }

    /// Waits until the controller logging to `NAME.log` stands by: it
    /// answers, and points at the leader.
    fn wait_for_standby(&self, name: &str) {
        let client = if name == "controller" {
            "client-a.toml"
        } else {
            "client-b.toml"
        };
        wait_until(&format!("{name} to stand by"), WAIT, || {
            let out = self.gru_with(client, &["fleet", "ls"]);
            let said = String::from_utf8_lossy(&out.stderr).into_owned();
            (!out.status.success() && said.contains("standby")).then_some(())
        });
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    fn logs(&self) -> String {
        let mut all = format!("--- controller ---\n{}", self.log("controller.log"));
        if self.standby.is_some() {
            all.push_str(&format!(
                "\n--- controller-b ---\n{}",
                self.log("controller-b.log")
            ));
        }
        for e in std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("minion-") && name.ends_with(".log") {
                all.push_str(&format!("\n--- {name} ---\n{}", self.log(&name)));
            }
        }
        all
    }

    /// Runs `gru ARGS` against the controller, as its operator.
    fn gru(&self, args: &[&str]) -> Output {
        Command::new(GRU)
            .args(args)
            .env("GRU_CONFIG", self.dir.path().join("client.toml"))
            .stdin(Stdio::null())
            .output()
            .expect("run gru")
    }

    fn ok(&self, args: &[&str]) -> Output {
        let out = self.gru(args);
        assert!(
            out.status.success(),
            "gru {} failed: {}{}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        out
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.ok(&all);
        serde_json::from_slice(&out.stdout).expect("JSON output")
    }

    fn fleet_info(&self) -> Value {
        self.json(&["fleet", "ls"])
            .as_array()
            .and_then(|a| a.first())
            .cloned()
            .expect("one fleet")
    }

    fn minions(&self) -> Vec<Value> {
        self.json(&["minion", "ls", "--all"])
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The group's desired capacity and instance ids, as moto has them.
    fn group(&self) -> (u32, BTreeSet<String>) {
        let g = self
            .rt
            .block_on(self.fleet.describe_group())
            .expect("DescribeAutoScalingGroups");
        (
            g.desired,
            g.instances.iter().map(|i| i.id.0.clone()).collect(),
        )
    }

    /// Instance ids in the target group, as moto has them.
    fn targets(&self) -> BTreeSet<String> {
        self.rt
            .block_on(testing::registered_targets(
                &self.clients,
                &self.target_group_arn,
            ))
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    }

    /// Instance `id`'s lifecycle state in the group, if it is still there.
    fn lifecycle(&self, id: &str) -> Option<AwsLifecycle> {
        self.rt
            .block_on(self.fleet.describe_group())
            .expect("DescribeAutoScalingGroups")
            .instances
            .iter()
            .find(|i| i.id.0 == id)
            .map(|i| i.lifecycle.clone())
    }

    /// Instances the group holds for `hook` (Pending:Wait, Terminating:Wait).
    fn awaiting(&self, hook: LifecycleHook) -> BTreeSet<String> {
        self.rt
            .block_on(self.fleet.describe_group())
            .expect("DescribeAutoScalingGroups")
            .awaiting(hook)
            .map(|i| i.id.0.clone())
            .collect()
    }

    /// The group terminates instance `id` by itself, as a health check or
    /// a rebalance would: no decrement, the group launches a replacement.
    fn group_terminates(&self, id: &str) {
        self.rt
            .block_on(
                self.clients
                    .autoscaling
                    .terminate_instance_in_auto_scaling_group()
                    .instance_id(id)
                    .should_decrement_desired_capacity(false)
                    .send(),
            )
            .expect("TerminateInstanceInAutoScalingGroup");
    }

    /// `gru events --json`, one event a line.
    fn events(&self) -> Vec<Value> {
        let out = self.ok(&["events", "--json"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The events about minion `id`, oldest first.
    fn events_about(&self, id: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["minion_id"] == id)
            .collect()
    }

    /// Stops every minion (each must still be running: AWS terminates
    /// instances, not processes), then the controller.
    fn stop(mut self, minions: Vec<(String, Proc)>) {
        for (id, mut p) in minions {
            assert!(
                p.child.try_wait().expect("wait").is_none(),
                "the minion of {id} exited by itself\n{}",
                self.logs()
            );
            let status = p.stop(Duration::from_secs(10));
            assert!(status.success(), "minion of {id} exited with {status}");
        }
        let status = self.controller.stop(Duration::from_secs(20));
        assert!(
            status.success(),
            "gru controller exited with {status}\n{}",
            self.logs()
        );
        if let Some(mut standby) = self.standby.take() {
            let status = standby.stop(Duration::from_secs(20));
            assert!(
                status.success(),
                "the second gru controller exited with {status}\n{}",
                self.logs()
            );
        }
    }

    /// Scales the fleet to 2, starts a minion on each instance the group
    /// launches, and waits until both are in service and in the target
    /// group. Returns the instance ids and the minion processes.
    fn two_in_service(&self, sink: &Sink) -> (BTreeSet<String>, Vec<(String, Proc)>) {
        self.ok(&["scale", FLEET, "2"]);
        let ids = wait_until("the group to launch two instances", WAIT, || {
            let (desired, ids) = self.group();
            (desired == 2 && ids.len() == 2).then_some(ids)
        });
        let minions: Vec<(String, Proc)> = ids
            .iter()
            .map(|id| (id.clone(), self.minion(id, sink)))
            .collect();
        wait_until(
            "two minions in service and in the target group",
            WAIT,
            || {
                let f = self.fleet_info();
                (f["in_service"].as_u64() == Some(2) && self.targets() == ids).then_some(())
            },
        );
        (ids, minions)
    }

    /// `gru minion` for instance `id`, as its cloud-init would start it.
    /// With identity documents, its instance metadata (instance id and
    /// signed document) comes from a stub of its own, and its config holds
    /// no join token.
    fn minion(&self, id: &str, sink: &Sink) -> Proc {
        let config = self.dir.path().join(format!("minion-{id}.toml"));
        let (token, aws) = match &self.signer_key {
            None => (
                format!(
                    "join_token_file = {:?}\n",
                    self.dir.path().join("token").display().to_string()
                ),
                String::new(),
            ),
            Some(key) => {
                let stub = ImdsStub::start(id, &self.signed_document(id, key));
                let at = stub.addr;
                self.imds.lock().expect("lock").push(stub);
                (
                    String::new(),
                    format!("[aws]\nimds = true\nimds_endpoint = \"{at}\"\n"),
                )
            }
        };
        std::fs::write(
            &config,
            format!(
                "controller = {}\nca_file = {:?}\nfleet = \"{FLEET}\"\n\
                 stop_grace = \"1s\"\n{token}\
                 [engine]\nlisten = \"127.0.0.1:0\"\ndownstream = \"{}\"\n{aws}",
                match &self.url_b {
                    Some(b) => format!("[{:?}, {b:?}]", self.url),
                    None => format!("{:?}", self.url),
                },
                self.ca.display().to_string(),
                sink.addr
            ),
        )
        .expect("write minion config");
        let log = std::fs::File::create(self.dir.path().join(format!("minion-{id}.log")))
            .expect("log file");
        let mut cmd = Command::new(GRU);
        cmd.args(["minion", "--config"]).arg(&config);
        if self.signer_key.is_none() {
            cmd.args(["--instance-id", id]);
        }
        cmd.env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        Proc::spawn(&format!("gru minion {id}"), &mut cmd)
    }
}

impl Cluster {
    /// Instance `id`'s identity document as IMDS serves it, launched just
    /// now in moto's account and region, and its base64 signature by the
    /// stand-in signer's key.
    fn signed_document(&self, id: &str, key: &std::path::Path) -> (String, String) {
        use base64::Engine as _;
        let now = jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ");
        let document = format!(
            "{{\n  \"accountId\" : \"{DEFAULT_ACCOUNT}\",\n  \"availabilityZone\" : \"{r}a\",\n  \"instanceId\" : \"{id}\",\n  \"pendingTime\" : \"{now}\",\n  \"privateIp\" : \"127.0.0.1\",\n  \"region\" : \"{r}\",\n  \"version\" : \"2017-09-30\"\n}}",
            r = testing::REGION
        );
        let doc_file = self.dir.path().join(format!("document-{id}.json"));
        let sig_file = self.dir.path().join(format!("signature-{id}"));
        std::fs::write(&doc_file, &document).expect("write document");
        openssl(
            Command::new("openssl")
                .args(["dgst", "-sha256", "-sign"])
                .arg(key)
                .arg("-out")
                .arg(&sig_file)
                .arg(&doc_file),
        );
        let signature = std::fs::read(&sig_file).expect("signature");
        (
            document,
            base64::engine::general_purpose::STANDARD.encode(signature),
        )
    }
}

/// Runs openssl, which the test command installs; fails loudly without it.
fn openssl(cmd: &mut Command) {
    let out = cmd
        .output()
        .expect("openssl must be installed (./scripts/test installs it)");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One instance's metadata service (IMDSv2: a token from PUT, then GETs):
/// its id, placement, address, in-service lifecycle state and signed
/// identity document. Answers on loopback until dropped.
struct ImdsStub {
    addr: std::net::SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl ImdsStub {
    fn start(id: &str, (document, signature): &(String, String)) -> ImdsStub {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let paths: std::collections::HashMap<String, String> = [
            ("/latest/meta-data/instance-id", id),
            ("/latest/meta-data/placement/region", testing::REGION),
            (
                "/latest/meta-data/placement/availability-zone",
                "us-east-1a",
            ),
            ("/latest/meta-data/local-ipv4", "127.0.0.1"),
            (
                "/latest/meta-data/autoscaling/target-lifecycle-state",
                "InService",
            ),
            ("/latest/dynamic/instance-identity/document", document),
            ("/latest/dynamic/instance-identity/signature", signature),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopped.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).is_ok_and(|n| n == 1) {
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head);
                let mut words = head.split_whitespace();
                let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
                let (status, body) = match (method, path) {
                    ("PUT", "/latest/api/token") => ("200 OK", "stub-token".to_owned()),
                    ("GET", p) => match paths.get(p) {
                        Some(v) => ("200 OK", v.clone()),
                        None => ("404 Not Found", String::new()),
                    },
                    _ => ("405 Method Not Allowed", String::new()),
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        ImdsStub { addr, stop }
    }
}

impl Drop for ImdsStub {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // Wakes the accept loop so that it sees the flag.
        let _ = std::net::TcpStream::connect(self.addr);
    }
}

fn path_of(m: &Value) -> Vec<String> {
    m["history"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| h["to"].as_str().map(str::to_owned))
        .collect()
}

/// The minion of instance `id` among `minions`.
/// Once a drain began on this path, the minion never served again.
fn never_back_in_service(path: &[String]) {
    let drain_began = path
        .iter()
        .position(|s| s.starts_with("Draining/"))
        .expect("a drain");
    assert!(
        !path[drain_began..]
            .iter()
            .any(|s| s == "Ready" || s == "InService"),
        "never back in service: {path:?}"
    );
}

fn by_instance(minions: &[Value], id: &str) -> Value {
    minions
        .iter()
        .find(|m| m["instance_id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("no minion for instance {id} in {minions:#?}"))
}

/// Whether event `e`'s message contains `what`.
fn says(what: &str) -> impl Fn(&Value) -> bool + '_ {
    move |e| e["message"].as_str().is_some_and(|m| m.contains(what))
}

/// Whether event `e` is a transition to `state`.
fn to(state: &str) -> impl Fn(&Value) -> bool + '_ {
    move |e| e["to"] == state
}

/// The position of the first of `events` that is `f`.
fn first(events: &[Value], what: &str, f: &dyn Fn(&Value) -> bool) -> usize {
    events
        .iter()
        .position(f)
        .unwrap_or_else(|| panic!("no event {what} in {events:#?}"))
}

#[test]
fn an_auto_scaling_group_scales_out_and_in_with_real_minions() {
    let started = Instant::now();
    let cluster = Cluster::start();
    let sink = Sink::start();

    // Out: 0 → 2. Without --wait: nothing joins until minions are started.
    let (ids, minions) = cluster.two_in_service(&sink);
    let listed = cluster.minions();
    for id in &ids {
        let m = by_instance(&listed, id);
        assert_eq!(m["state"], "InService", "{m:#?}");
        assert_eq!(path_of(&m), ["Joining", "Ready", "InService"], "{m:#?}");
    }

    // In: 2 → 1, waiting as an operator would.
    cluster.ok(&["scale", FLEET, "1", "--wait", "--timeout", "60s"]);
    let listed = cluster.minions();
    let gone: Vec<&Value> = listed.iter().filter(|m| m["state"] == "Gone").collect();
    let kept: Vec<&Value> = listed
        .iter()
        .filter(|m| m["state"] == "InService")
        .collect();
    assert_eq!((gone.len(), kept.len()), (1, 1), "{listed:#?}");
    let (victim, survivor) = (gone[0], kept[0]);
    let victim_instance = victim["instance_id"].as_str().expect("instance id");
    let survivor_instance = survivor["instance_id"].as_str().expect("instance id");
    assert_eq!(
        path_of(victim),
        [
            "Joining",
            "Ready",
            "InService",
            "Draining/Deregistering",
            "Draining/Flushing",
            "Draining/AwaitingUnused",
            "Drained",
            "Terminating",
            "Gone"
        ],
        "{victim:#?}"
    );
    // The group: desired decremented once, by the terminate, and only the
    // survivor's instance left; the target group lists only the survivor.
    assert_eq!(
        BTreeSet::from([victim_instance.to_owned(), survivor_instance.to_owned()]),
        ids
    );
    let (desired, left) = cluster.group();
    assert_eq!(desired, 1);
    assert_eq!(left, BTreeSet::from([survivor_instance.to_owned()]));
    assert_eq!(
        cluster.targets(),
        BTreeSet::from([survivor_instance.to_owned()])
    );
    let victim_id = victim["id"].as_str().expect("minion id");
    let about = cluster.events_about(victim_id);
    // Deregistered before the drain command, terminated only once drained.
    let deregistered = first(
        &about,
        "deregistered",
        &says("deregistered from the load balancer"),
    );
    let drain = first(&about, "drain command", &says("drain command sent"));
    let drained = first(&about, "-> Drained", &to("Drained"));
    let terminating = first(&about, "-> Terminating", &to("Terminating"));
    assert!(
        deregistered < drain && drain < drained && drained < terminating,
        "{about:#?}"
    );
    let decrements = about
        .iter()
        .filter(|e| says("desired capacity decremented")(e))
        .count();
    assert_eq!(decrements, 1, "{about:#?}");

    // A second of reconcile passes later nothing else moved.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(cluster.group(), (1, left));
    assert_eq!(cluster.fleet_info()["in_service"].as_u64(), Some(1));

    // AWS terminates instances, not processes: the victim's minion was not
    // stopped by the controller. Stop every process here.
    cluster.stop(minions);
    sink.stop();
    eprintln!("aws scenario took {:?}", started.elapsed());
}

#[test]
fn minions_join_with_identity_documents_and_no_token() {
    let cluster = Cluster::start_with(Setup {
        identity: true,
        ..Setup::default()
    });
    let sink = Sink::start();
    let (ids, minions) = cluster.two_in_service(&sink);
    for (id, _) in &minions {
        let config = cluster.log(&format!("minion-{id}.toml"));
        assert!(
            !config.contains("token"),
            "a minion config names a token:\n{config}"
        );
        assert!(
            cluster
                .log(&format!("minion-{id}.log"))
                .contains("joined fleet"),
            "{}",
            cluster.logs()
        );
    }
    // Each document was used once: a copy is refused (the minions rejoin
    // with their certificates, not their documents).
    let id = ids.iter().next().expect("an instance");
    let key = cluster.signer_key.clone().expect("signer");
    let copied = cluster.signed_document(id, &key);
    let stub = ImdsStub::start(id, &copied);
    let config = cluster.dir.path().join("copycat.toml");
    std::fs::write(
        &config,
        format!(
            "controller = {:?}\nca_file = {:?}\nfleet = \"{FLEET}\"\nstop_grace = \"1s\"\n\
             [engine]\nlisten = \"127.0.0.1:0\"\ndownstream = \"{}\"\n\
             [aws]\nimds = true\nimds_endpoint = \"{}\"\n",
            cluster.url,
            cluster.ca.display().to_string(),
            sink.addr,
            stub.addr
        ),
    )
    .expect("config");
    let log = cluster.dir.path().join("minion-copycat.log");
    let copycat = Proc::spawn(
        "gru minion copycat",
        Command::new(GRU)
            .args(["minion", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log")),
    );
    wait_until("the copied document to be refused", WAIT, || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("already joined with its identity document")
            .then_some(())
    });
    let refused = cluster
        .events()
        .into_iter()
        .filter(|e| e["kind"] == "security")
        .count();
    assert!(refused >= 1, "no security event for the copy");
    let mut copycat = copycat;
    copycat.stop(Duration::from_secs(10));
    drop(stub);
    cluster.stop(minions);
    sink.stop();
}

#[test]
fn a_termination_the_group_starts_is_drained_heartbeated_and_continued() {
    let started = Instant::now();
    let cluster = Cluster::start_with(Setup {
        terminating: true,
        ..Setup::default()
    });
    let sink = Sink::start();

    cluster.ok(&["scale", FLEET, "2"]);
    let ids = wait_until("the group to launch two instances", WAIT, || {
        let (desired, ids) = cluster.group();
        (desired == 2 && ids.len() == 2).then_some(ids)
    });
    let mut minions: Vec<(String, Proc)> = ids
        .iter()
        .map(|id| (id.clone(), cluster.minion(id, &sink)))
        .collect();
    wait_until(
        "two minions in service and in the target group",
        WAIT,
        || {
            let f = cluster.fleet_info();
            (f["in_service"].as_u64() == Some(2) && cluster.targets() == ids).then_some(())
        },
    );
    let mut both = ids.iter();
    let victim_instance = both.next().expect("two instances").clone();
    let survivor_instance = both.next().expect("two instances").clone();
    let listed = cluster.minions();
    let victim = by_instance(&listed, &victim_instance);
    let victim_id = victim["id"].as_str().expect("minion id").to_owned();
    let survivor_id = by_instance(&listed, &survivor_instance)["id"]
        .as_str()
        .expect("minion id")
        .to_owned();

    // The group terminates an instance by itself; the harness's layer
    // holds it in Terminating:Wait until the controller completes it.
    cluster.group_terminates(&victim_instance);
    wait_until("the victim gone from gru and from the group", WAIT, || {
        let m = by_instance(&cluster.minions(), &victim_instance);
        (m["state"] == "Gone" && cluster.lifecycle(&victim_instance).is_none()).then_some(())
    });
    let victim = by_instance(&cluster.minions(), &victim_instance);
    assert_eq!(
        path_of(&victim),
        [
            "Joining",
            "Ready",
            "InService",
            "Draining/Deregistering",
            "Draining/Flushing",
            "Draining/AwaitingUnused",
            "Drained",
            "Terminating",
            "Gone"
        ],
        "{victim:#?}"
    );
    let about = cluster.events_about(&victim_id);
    let draining = first(&about, "-> Draining", &to("Draining/Deregistering"));
    assert!(
        says("terminating lifecycle hook")(&about[draining]),
        "{:#?}",
        about[draining]
    );
    let deregistered = first(
        &about,
        "deregistered",
        &says("deregistered from the load balancer"),
    );
    let drain = first(&about, "drain command", &says("drain command sent"));
    let drained = first(&about, "-> Drained", &to("Drained"));
    let heartbeat = first(&about, "heartbeat", &says("lifecycle heartbeat recorded"));
    let completed = first(
        &about,
        "CONTINUE",
        &says(&format!(
            "terminating lifecycle action of {victim_instance} completed: CONTINUE"
        )),
    );
    assert!(
        deregistered < drain && drain < drained && heartbeat < completed && drained < completed,
        "{about:#?}"
    );
    // The group started it: the controller neither decremented nor asked
    // for a replacement.
    assert!(
        !about
            .iter()
            .any(|e| says("desired capacity decremented")(e) || says("to be replaced")(e)),
        "{about:#?}"
    );
    assert!(!cluster.targets().contains(&victim_instance));

    // The other minion kept serving throughout.
    let survivor = by_instance(&cluster.minions(), &survivor_instance);
    assert_eq!(survivor["state"], "InService", "{survivor:#?}");
    assert_eq!(
        path_of(&survivor),
        ["Joining", "Ready", "InService"],
        "{survivor:#?}"
    );
    assert!(
        !cluster
            .events_about(&survivor_id)
            .iter()
            .any(|e| to("Draining/Deregistering")(e)),
        "{survivor:#?}"
    );
    assert!(cluster.targets().contains(&survivor_instance));

    // The group's replacement (desired never moved) joins and serves.
    let replacement = wait_until("the group to launch a replacement", WAIT, || {
        let (desired, now) = cluster.group();
        assert_eq!(desired, 2);
        now.iter().find(|id| !ids.contains(*id)).cloned()
    });
    minions.push((replacement.clone(), cluster.minion(&replacement, &sink)));
    let expected = BTreeSet::from([survivor_instance.clone(), replacement.clone()]);
    wait_until("the replacement in service", WAIT, || {
        let f = cluster.fleet_info();
        (f["in_service"].as_u64() == Some(2) && cluster.targets() == expected).then_some(())
    });
    assert_eq!(cluster.group(), (2, expected));

    cluster.stop(minions);
    sink.stop();
    eprintln!("aws terminating hook scenario took {:?}", started.elapsed());
}

#[test]
fn a_launching_hook_is_completed_only_once_the_minion_has_joined() {
    let started = Instant::now();
    let cluster = Cluster::start_with(Setup {
        launching: true,
        ..Setup::default()
    });
    let sink = Sink::start();

    cluster.ok(&["scale", FLEET, "1"]);
    let held = wait_until("an instance held in Pending:Wait and known", WAIT, || {
        let held = cluster.awaiting(LifecycleHook::Launching);
        let id = held.first()?.clone();
        (held.len() == 1
            && cluster
                .minions()
                .iter()
                .any(|m| m["instance_id"] == id.as_str()))
        .then_some(id)
    });
    // No minion process yet: several passes go by and the action stays
    // open.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(cluster.lifecycle(&held), Some(AwsLifecycle::PendingWait));
    let pending = by_instance(&cluster.minions(), &held);
    assert_eq!(pending["state"], "Pending", "{pending:#?}");
    let minion_id = pending["id"].as_str().expect("minion id").to_owned();
    assert!(
        !cluster
            .events_about(&minion_id)
            .iter()
            .any(|e| says("launching lifecycle action")(e)),
        "completed before the minion joined"
    );
    assert!(cluster.targets().is_empty());

    let minions = vec![(held.clone(), cluster.minion(&held, &sink))];
    wait_until("the instance in service in the group", WAIT, || {
        (cluster.lifecycle(&held) == Some(AwsLifecycle::InService)).then_some(())
    });
    wait_until(
        "the minion in service and in the target group",
        WAIT,
        || {
            let m = by_instance(&cluster.minions(), &held);
            (m["state"] == "InService" && cluster.targets() == BTreeSet::from([held.clone()]))
                .then_some(())
        },
    );
    let about = cluster.events_about(&minion_id);
    let ready = first(&about, "-> Ready", &to("Ready"));
    let completed = first(
        &about,
        "CONTINUE",
        &says(&format!(
            "launching lifecycle action of {held} completed: CONTINUE"
        )),
    );
    assert!(ready < completed, "{about:#?}");
    assert_eq!(cluster.group(), (1, BTreeSet::from([held.clone()])));

    cluster.stop(minions);
    sink.stop();
    eprintln!("aws launching hook scenario took {:?}", started.elapsed());
}

/// The controller SIGKILLed each time the victim of a scale-in reaches a
/// new step, and started again on the same state directory: the drain goes
/// on from that step, the victim is never registered again, the group is
/// decremented exactly once, and the survivor serves throughout.
#[test]
fn a_controller_killed_at_each_step_of_a_scale_in_finishes_it_after_restart() {
    let mut cluster = Cluster::start();
    let sink = Sink::start();
    let (ids, minions) = cluster.two_in_service(&sink);

    cluster.ok(&["scale", FLEET, "1"]);
    let mut killed_at = Vec::new();
    let victim = wait_until("the victim to be gone", Duration::from_secs(180), || {
        let listed = cluster.minions();
        let victim = listed.iter().find(|m| {
            m["state"].as_str().is_some_and(|s| {
                s.starts_with("Draining/") || s == "Drained" || s == "Terminating" || s == "Gone"
            })
        })?;
        let state = victim["state"].as_str().unwrap_or_default().to_owned();
        if state == "Gone" {
            return Some(victim.clone());
        }
        if !killed_at.contains(&state) {
            killed_at.push(state);
            cluster.restart_controller();
        }
        None
    });
    eprintln!("controller killed with the victim at {killed_at:?}");
    assert!(
        killed_at.len() >= 2,
        "killed at {killed_at:?}: at least two steps of the drain"
    );

    let victim_instance = victim["instance_id"].as_str().expect("instance id");
    let survivor_instance = ids
        .iter()
        .find(|i| *i != victim_instance)
        .expect("survivor")
        .clone();
    let path = path_of(&victim);
    never_back_in_service(&path);
    // Terminating is recorded before the terminate call, so wherever the
    // kill landed the history reads Drained → Terminating → Gone: drained
    // before it went, and its termination on record.
    let drained = path.iter().position(|s| s == "Drained").expect("drained");
    assert_eq!(path.last().map(String::as_str), Some("Gone"), "{path:?}");
    let between = &path[drained + 1..path.len() - 1];
    assert!(
        !between.is_empty() && between.iter().all(|s| s == "Terminating"),
        "{path:?}"
    );
    let about = cluster.events_about(victim["id"].as_str().expect("id"));
    let decrements = about
        .iter()
        .filter(|e| says("desired capacity decremented")(e))
        .count();
    assert_eq!(decrements, 1, "{about:#?}");
    // The group: decremented once, only the survivor left, and the target
    // group lists only the survivor.
    let (desired, left) = cluster.group();
    assert_eq!(desired, 1, "{}", cluster.logs());
    assert_eq!(left, BTreeSet::from([survivor_instance.clone()]));
    assert_eq!(cluster.targets(), BTreeSet::from([survivor_instance]));
    assert_eq!(cluster.fleet_info()["in_service"].as_u64(), Some(1));
    cluster.stop(minions);
    sink.stop();
}

/// Sends `signal` (STOP, CONT) to process `pid` with kill(1).
fn signal(pid: i32, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid}");
}

/// `gru_controller_leading` as the controller at metrics address `addr`
/// serves it.
fn leading(addr: &str) -> i64 {
    let body = crate::observe::get_ok(addr, "/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix("gru_controller_leading "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no gru_controller_leading at {addr}:\n{body}"))
}

/// The lease item in the HA set-up's table, read as a standby would.
fn lease_holder(cluster: &Cluster) -> Option<gru_aws::dynamo::LeaseRecord> {
    let client = testing::dynamodb_client(&cluster._moto.url, DEFAULT_ACCOUNT);
    let reader = gru_aws::dynamo::Lease::new(
        client,
        HA_TABLE,
        gru_controller::config::LeaderConfig {
            name: "e2e-reader".into(),
            advertise: "https://127.0.0.1:1".into(),
            lease: Duration::from_secs(2),
            heartbeat: Duration::from_millis(500),
        },
        gru_aws::dynamo::Fence::default(),
    );
    cluster.rt.block_on(reader.read()).expect("read the lease")
}

/// Two controllers on one DynamoDB table: the leader is SIGKILLed while a
/// minion drains; the standby takes over within a lease and a pass, the
/// drain completes, and the group is decremented exactly once.
#[test]
fn a_leader_killed_mid_drain_hands_over_and_the_drain_ends_with_one_decrement() {
    let mut cluster = Cluster::start_ha();
    let sink = Sink::start();
    let (ids, minions) = cluster.two_in_service(&sink);
    assert_eq!(lease_holder(&cluster).expect("a lease").holder, "ctl-a");
    // Both answer scrapes: the leader says it leads, the standby that it
    // does not.
    let (metrics_a, metrics_b) = cluster.metrics.clone().expect("HA metrics");
    assert_eq!((leading(&metrics_a), leading(&metrics_b)), (1, 0));

    cluster.ok(&["scale", FLEET, "1"]);
    let victim = wait_until("a drain to begin", WAIT, || {
        cluster.minions().into_iter().find(|m| {
            m["state"]
                .as_str()
                .is_some_and(|s| s.starts_with("Draining/"))
        })
    });
    let victim_id = victim["id"].as_str().expect("id").to_owned();
    let killed = Instant::now();
    cluster.controller.child.kill().expect("kill the leader");
    let _ = cluster.controller.child.wait();
    cluster.wait_to_lead("client-b.toml");
    eprintln!(
        "failover (leader SIGKILLed mid-drain → standby serves): {:?}",
        killed.elapsed()
    );
    assert_eq!(lease_holder(&cluster).expect("a lease").holder, "ctl-b");
    assert_eq!(leading(&metrics_b), 1);
    // `gru controller status` asks both: the killed one is unreachable,
    // the other leads (exit 0: exactly one does).
    let rows = cluster.json(&["controller", "status"]);
    let rows = rows.as_array().expect("one row per controller");
    let leaders: Vec<&str> = rows
        .iter()
        .filter(|r| r["leading"] == true)
        .filter_map(|r| r["controller"].as_str())
        .collect();
    assert_eq!(leaders, ["ctl-b"], "{rows:#?}");
    assert_eq!(rows.len(), 2, "{rows:#?}");

    let gone = wait_until("the victim to be gone", Duration::from_secs(120), || {
        cluster
            .minions()
            .into_iter()
            .find(|m| m["id"] == victim_id.as_str() && m["state"] == "Gone")
    });
    never_back_in_service(&path_of(&gone));
    let about = cluster.events_about(&victim_id);
    let decrements = about
        .iter()
        .filter(|e| says("desired capacity decremented")(e))
        .count();
    assert_eq!(decrements, 1, "{about:#?}\n{}", cluster.logs());
    let victim_instance = gone["instance_id"].as_str().expect("instance id");
    let survivor = ids
        .iter()
        .find(|i| *i != victim_instance)
        .expect("survivor")
        .clone();
    let (desired, left) = cluster.group();
    assert_eq!(desired, 1, "{}", cluster.logs());
    assert_eq!(left, BTreeSet::from([survivor.clone()]));
    assert_eq!(cluster.targets(), BTreeSet::from([survivor]));

    // The killed controller comes back as a standby.
    cluster.restart_first_as_standby();
    cluster.stop(minions);
    sink.stop();
}

/// A leader paused (SIGSTOP) past its lease: the standby takes over and
/// scales in; the old leader, resumed, finds itself deposed and exits
/// without a cloud call or a write: the group keeps what the new leader
/// set, though the old one's memory still holds the old pin.
#[test]
fn a_paused_leader_finds_itself_deposed_and_changes_nothing() {
    let mut cluster = Cluster::start_ha();
    let sink = Sink::start();
    let (ids, minions) = cluster.two_in_service(&sink);
    let old = cluster.controller.pid();
    signal(old, "STOP");
    cluster.wait_to_lead("client-b.toml");
    let b = |args: &[&str]| {
        let out = cluster.gru_with("client-b.toml", args);
        assert!(
            out.status.success(),
            "gru {args:?} at the new leader: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            cluster.logs()
        );
        out
    };
    b(&["scale", FLEET, "1"]);
    let survivor = cluster.wait(
        "the new leader to scale in",
        Duration::from_secs(120),
        || {
            let (desired, left) = cluster.group();
            (desired == 1 && left.len() == 1 && cluster.targets() == left).then_some(left)
        },
    );
    let term_b = lease_holder(&cluster).expect("a lease");
    assert_eq!(term_b.holder, "ctl-b");

    // Resumed, the old leader's memory says 2: it must find itself
    // deposed instead of acting on it.
    signal(old, "CONT");
    let status = wait_until("the old leader to step down", WAIT, || {
        cluster.controller.child.try_wait().expect("wait")
    });
    assert_eq!(
        status.code(),
        Some(75),
        "the deposed leader exits with EX_TEMPFAIL\n{}",
        cluster.log("controller.log")
    );
    assert!(
        cluster.log("controller.log").contains("stepped down"),
        "{}",
        cluster.log("controller.log")
    );
    // Nothing it could have done landed: the group, the target group and
    // the lease are the new leader's.
    let (desired, left) = cluster.group();
    assert_eq!((desired, &left), (1, &survivor), "{}", cluster.logs());
    assert_eq!(cluster.targets(), survivor, "{}", cluster.logs());
    let lease = lease_holder(&cluster).expect("a lease");
    assert_eq!((lease.holder.as_str(), lease.term), ("ctl-b", term_b.term));
    assert!(ids.is_superset(&survivor));

    cluster.restart_first_as_standby();
    cluster.stop(minions);
    sink.stop();
}

/// The failover time, measured: the leader SIGKILLed ten times (each time
/// the other controller, then the killed one restarted as its standby);
/// each time the standby leads. Prints each time, the median and the
/// maximum; asserts only that every failover happened.
#[test]
fn every_one_of_ten_leader_kills_is_taken_over_by_the_standby() {
    let mut cluster = Cluster::start_ha();
    let mut times = Vec::new();
    for i in 0..10 {
        // Even rounds kill the first controller, odd ones the second.
        let (victim, survivor_client, victim_name) = if i % 2 == 0 {
            (&mut cluster.controller, "client-b.toml", "controller")
        } else {
            (
                cluster.standby.as_mut().expect("second controller"),
                "client-a.toml",
                "controller-b",
            )
        };
        let killed = Instant::now();
        victim.child.kill().expect("kill the leader");
        let _ = victim.child.wait();
        cluster.wait_to_lead(survivor_client);
        times.push(killed.elapsed());
        let restarted = spawn_named_controller(cluster.dir.path(), victim_name);
        if i % 2 == 0 {
            cluster.controller = restarted;
        } else {
            cluster.standby = Some(restarted);
        }
        cluster.wait_for_standby(victim_name);
    }
    let mut sorted = times.clone();
    sorted.sort();
    eprintln!(
        "failover over {} kills (lease {HA_LEASE}, heartbeat {HA_HEARTBEAT}): {:?}; median {:?}, max {:?}",
        times.len(),
        times,
        sorted[sorted.len() / 2],
        sorted[sorted.len() - 1]
    );
    cluster.stop(Vec::new());
}
