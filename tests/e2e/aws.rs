//! The controller on AWS, against moto (module `gru_aws::testing`): a real
//! `gru controller` process whose fleet is an Auto Scaling group, and a real
//! `gru minion` process per instance the group launches, started by this
//! test as the instance's cloud-init would (its instance id given with
//! `--instance-id`: moto's instance metadata lacks what the SDK needs).
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
use gru_aws::{AwsClients, AwsFleet, AwsFleetConfig};
use serde_json::Value;

use crate::harness::{GRU, Proc, Sink, wait_until};

const FLEET: &str = "prod";
const TOKEN: &str = "e2e-aws-join-token";
/// Bound on each wait: moto's first EC2 calls take seconds, then joins,
/// drains and a few reconcile passes.
const WAIT: Duration = Duration::from_secs(60);

/// Everything the scenario runs, stopped when dropped.
struct Cluster {
    rt: tokio::runtime::Runtime,
    clients: AwsClients,
    fleet: AwsFleet,
    target_group_arn: String,
    controller: Proc,
    /// `https://127.0.0.1:PORT`, for minions and the operator's client.
    url: String,
    ca: PathBuf,
    dir: tempfile::TempDir,
    // Dropped last: the processes above talk to it.
    _moto: MotoServer,
}

impl Cluster {
    fn start() -> Cluster {
        let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
        let moto = MotoServer::start();
        let clients = testing::clients(&moto.url, DEFAULT_ACCOUNT, NoInterceptor);
        let made = rt.block_on(testing::create_fleet(&clients, 0, 3, 0));
        let fleet = AwsFleet::from_clients(
            AwsFleetConfig::new(&made.group, &made.target_group_arn),
            clients.clone(),
        );

        let dir = tempfile::tempdir().expect("tempdir");
        let pki = gru_controller::pki::DevPki::in_dir(dir.path());
        pki.ensure().expect("dev pki");
        let token = dir.path().join("token");
        std::fs::write(&token, TOKEN).expect("token");
        // A port that was free a moment ago: the controller's config needs
        // its address before it starts, and the minions need it too.
        let port = testing::free_port();
        let config = dir.path().join("controller.toml");
        std::fs::write(
            &config,
            format!(
                r#"
listen = "127.0.0.1:{port}"
report_interval = "200ms"
lost_timeout = "5s"
eval_interval = "200ms"
join_timeout = "60s"
join_token_file = {token:?}
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
"#,
                token = token.display().to_string(),
                cert = pki.server_cert.display().to_string(),
                key = pki.server_key.display().to_string(),
                ca = pki.ca_cert.display().to_string(),
                group = made.group,
                arn = made.target_group_arn,
                url = moto.url,
            ),
        )
        .expect("write controller.toml");
        std::fs::write(
            dir.path().join("client.toml"),
            format!(
                "controller = \"https://127.0.0.1:{port}\"\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n",
                pki.ca_cert.display().to_string(),
                pki.admin_cert.display().to_string(),
                pki.admin_key.display().to_string(),
            ),
        )
        .expect("write client.toml");

        let log = std::fs::File::create(dir.path().join("controller.log")).expect("log file");
        let mut cmd = Command::new(GRU);
        cmd.args(["controller", "--config"])
            .arg(&config)
            // The SDK's default chain: environment credentials (moto takes
            // any), no shared files, no instance metadata.
            .env("AWS_ACCESS_KEY_ID", "moto")
            .env("AWS_SECRET_ACCESS_KEY", "moto")
            .env("AWS_REGION", testing::REGION)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_CONFIG_FILE", dir.path().join("no-aws-config"))
            .env(
                "AWS_SHARED_CREDENTIALS_FILE",
                dir.path().join("no-aws-credentials"),
            )
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_SESSION_TOKEN")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let controller = Proc::spawn("gru controller", &mut cmd);
        let mut cluster = Cluster {
            rt,
            clients,
            fleet,
            target_group_arn: made.target_group_arn,
            controller,
            url: format!("https://127.0.0.1:{port}"),
            ca: pki.ca_cert.clone(),
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
        cluster
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    fn logs(&self) -> String {
        let mut all = format!("--- controller ---\n{}", self.log("controller.log"));
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

    /// `gru minion` for instance `id`, as its cloud-init would start it.
    fn minion(&self, id: &str, sink: &Sink) -> Proc {
        let config = self.dir.path().join(format!("minion-{id}.toml"));
        std::fs::write(
            &config,
            format!(
                "controller = {:?}\nca_file = {:?}\nfleet = \"{FLEET}\"\n\
                 join_token_file = {:?}\nstop_grace = \"1s\"\n\
                 [engine]\nlisten = \"127.0.0.1:0\"\ndownstream = \"{}\"\n",
                self.url,
                self.ca.display().to_string(),
                self.dir.path().join("token").display().to_string(),
                sink.addr
            ),
        )
        .expect("write minion config");
        let log = std::fs::File::create(self.dir.path().join(format!("minion-{id}.log")))
            .expect("log file");
        let mut cmd = Command::new(GRU);
        cmd.args(["minion", "--config"])
            .arg(&config)
            .args(["--instance-id", id])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        Proc::spawn(&format!("gru minion {id}"), &mut cmd)
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

#[test]
fn an_auto_scaling_group_scales_out_and_in_with_real_minions() {
    let started = Instant::now();
    let cluster = Cluster::start();
    let sink = Sink::start();

    // Out: 0 → 2. Without --wait: nothing joins until minions are started.
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
    let by_instance = |minions: &[Value], id: &str| -> Value {
        minions
            .iter()
            .find(|m| m["instance_id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no minion for instance {id} in {minions:#?}"))
    };
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
            "Draining",
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
    let events = cluster.ok(&["events", "--json"]);
    let events: Vec<Value> = String::from_utf8_lossy(&events.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let victim_id = victim["id"].as_str().expect("minion id");
    let about: Vec<&Value> = events
        .iter()
        .filter(|e| e["minion_id"] == victim_id)
        .collect();
    let first = |what: &str, f: &dyn Fn(&Value) -> bool| {
        about
            .iter()
            .position(|e| f(e))
            .unwrap_or_else(|| panic!("no event {what} about {victim_id} in {about:#?}"))
    };
    // Deregistered before the drain command, terminated only once drained.
    let deregistered = first("deregistered", &|e| {
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("deregistered from the load balancer"))
    });
    let drain = first("drain command", &|e| {
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("drain command sent"))
    });
    let drained = first("-> Drained", &|e| e["to"] == "Drained");
    let terminating = first("-> Terminating", &|e| e["to"] == "Terminating");
    assert!(
        deregistered < drain && drain < drained && drained < terminating,
        "{about:#?}"
    );
    let decrements = about
        .iter()
        .filter(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.contains("desired capacity decremented"))
        })
        .count();
    assert_eq!(decrements, 1, "{about:#?}");

    // A second of reconcile passes later nothing else moved.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(cluster.group(), (1, left));
    assert_eq!(cluster.fleet_info()["in_service"].as_u64(), Some(1));

    // AWS terminates instances, not processes: the victim's minion was not
    // stopped by the controller. Stop every process here.
    for (id, p) in &mut minions {
        assert!(
            p.child.try_wait().expect("wait").is_none(),
            "the minion of {id} exited by itself\n{}",
            cluster.logs()
        );
        let status = p.stop(Duration::from_secs(10));
        assert!(status.success(), "minion of {id} exited with {status}");
    }
    let mut cluster = cluster;
    let status = cluster.controller.stop(Duration::from_secs(20));
    assert!(
        status.success(),
        "gru controller exited with {status}\n{}",
        cluster.logs()
    );
    sink.stop();
    eprintln!("aws scenario took {:?}", started.elapsed());
}
