//! A moto server and fixtures for tests that run gru-aws (or a whole
//! controller) against moto, a third-party emulation of the AWS APIs.
//! Compiled only with the `testing` feature: this crate's tests/moto.rs and
//! the gru crate's end-to-end tests use it.
//!
//! [`MotoServer::start`] runs moto_server's own entry point
//! (`moto.server.main`, what `.venv/bin/moto_server` runs) from the Python
//! in `GRU_TEST_PYTHON` (default `./.venv/bin/python`), on a free loopback
//! port, and waits until `GET /moto-api/` answers. A few lines of Python
//! around it end moto when this process's end of its stdin closes, so no
//! moto outlives its test process, however that ends (a Rust test binary
//! runs no destructor for a value shared by all its tests).
//!
//! [`MotoAccount`] puts every request of a client in one moto account (the
//! `x-moto-account-id` header), so tests sharing a server do not see each
//! other; [`create_fleet`] makes the VPC, subnet, launch template, target
//! group and Auto Scaling group a fleet needs.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use aws_sdk_autoscaling::config::interceptors::BeforeTransmitInterceptorContextMut;
use aws_sdk_autoscaling::config::retry::RetryConfig;
use aws_sdk_autoscaling::config::timeout::TimeoutConfig;
use aws_sdk_autoscaling::config::{
    BehaviorVersion, ConfigBag, Credentials, Intercept, Region, RuntimeComponents,
};
use aws_sdk_autoscaling::error::BoxError;
use aws_sdk_autoscaling::types::LaunchTemplateSpecification;
use aws_sdk_ec2::types::{
    LaunchTemplateInstanceNetworkInterfaceSpecificationRequest, RequestLaunchTemplateData,
};
use aws_sdk_elasticloadbalancingv2::types::{ProtocolEnum, TargetTypeEnum};
use rand::Rng;

use crate::AwsClients;

/// Bound on moto's start.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// The region every fixture is in.
pub const REGION: &str = "us-east-1";
/// The availability zone of the fixture's subnet.
pub const ZONE: &str = "us-east-1a";
/// The target group's port.
pub const ENGINE_PORT: u16 = 2575;
/// moto's default account: where requests without the account header go.
pub const DEFAULT_ACCOUNT: &str = "123456789012";

/// What a test that cannot start moto says.
pub const INSTALL_HINT: &str = "moto's server is needed for these tests: run ./scripts/test, which \
     installs moto[server]==5.2.5 into ./.venv (or set GRU_TEST_PYTHON to a Python with it)";

/// Starts moto_server's entry point on the port given as argv[1] and exits
/// when stdin reaches its end (this test process has gone).
///
/// Before serving, it adds to moto 5.2.5's Auto Scaling backend the
/// lifecycle hooks it stores but never runs, as AWS documents them:
/// - with a launching hook, new instances wait in `Pending:Wait` (and count
///   as capacity); CONTINUE puts one in service, ABANDON terminates it and
///   the group launches a replacement;
/// - with a terminating hook, TerminateInstanceInAutoScalingGroup lowers the
///   desired capacity at once if asked and leaves the instance in
///   `Terminating:Wait`; CONTINUE or ABANDON then terminates it;
/// - CompleteLifecycleAction and RecordLifecycleActionHeartbeat (moto answers
///   both with 500 NotImplemented) act on an instance waiting for that hook
///   and answer ValidationError otherwise. Heartbeat timeouts do not run:
///   nothing here waits for one.
const LAUNCHER: &str = r#"
import os, sys, threading
port = sys.argv[1]
def watch():
    sys.stdin.read()
    os._exit(0)
threading.Thread(target=watch, daemon=True).start()

import moto.autoscaling.models as models
import moto.autoscaling.responses as responses
from moto.autoscaling.exceptions import ValidationError
from moto.core.responses import EmptyResult

LAUNCHING = "autoscaling:EC2_INSTANCE_LAUNCHING"
TERMINATING = "autoscaling:EC2_INSTANCE_TERMINATING"
WAIT = {LAUNCHING: "Pending:Wait", TERMINATING: "Terminating:Wait"}

def hooked(group, transition):
    return any(h.auto_scaling_group_name == group.name and h.lifecycle_transition == transition
               for h in group.autoscaling_backend.lifecycle_hooks.values())

def active_instances(self):
    return [s for s in self.instance_states if s.lifecycle_state in ("InService", "Pending:Wait")]
models.FakeAutoScalingGroup.active_instances = active_instances

launch = models.FakeAutoScalingGroup.replace_autoscaling_group_instances
def replace_autoscaling_group_instances(self, count_needed, propagated_tags):
    before = {id(s) for s in self.instance_states}
    launch(self, count_needed, propagated_tags)
    if hooked(self, LAUNCHING):
        for s in self.instance_states:
            if id(s) not in before:
                s.lifecycle_state = "Pending:Wait"
models.FakeAutoScalingGroup.replace_autoscaling_group_instances = replace_autoscaling_group_instances

terminate = models.AutoScalingBackend.terminate_instance
def terminate_instance(self, instance_id, should_decrement):
    state = next((s for g in self.autoscaling_groups.values() for s in g.instance_states
                  if s.instance.id == instance_id), None)
    if state is None or not hooked(state.instance.autoscaling_group, TERMINATING):
        return terminate(self, instance_id, should_decrement)
    group = state.instance.autoscaling_group
    original_size = group.desired_capacity
    state.lifecycle_state = "Terminating:Wait"
    if should_decrement:
        group.desired_capacity = original_size - 1
    group.set_desired_capacity(group.desired_capacity)
    return models.TerminateInstanceActivity(state.instance, original_size)
models.AutoScalingBackend.terminate_instance = terminate_instance

def waiting(backend, group_name, hook_name, instance_id):
    group = backend.autoscaling_groups.get(group_name)
    hook = backend.lifecycle_hooks.get(f"{group_name}_{hook_name}")
    if group is None or hook is None:
        raise ValidationError(f"No Lifecycle Hook found with name {hook_name} in group {group_name}")
    wait = WAIT.get(hook.lifecycle_transition)
    for s in group.instance_states:
        if s.instance.id == instance_id and s.lifecycle_state == wait:
            return group, s
    raise ValidationError(f"No active Lifecycle Action found with instance ID {instance_id}")

def complete_lifecycle_action(self, group_name, hook_name, instance_id, result):
    group, state = waiting(self, group_name, hook_name, instance_id)
    if state.lifecycle_state == "Pending:Wait" and result == "CONTINUE":
        state.lifecycle_state = "InService"
        return
    group.instance_states = [s for s in group.instance_states if s is not state]
    self.ec2_backend.terminate_instances([instance_id])
    group.set_desired_capacity(group.desired_capacity)
models.AutoScalingBackend.complete_lifecycle_action = complete_lifecycle_action

def record_lifecycle_action_heartbeat(self, group_name, hook_name, instance_id):
    waiting(self, group_name, hook_name, instance_id)
models.AutoScalingBackend.record_lifecycle_action_heartbeat = record_lifecycle_action_heartbeat

def complete_lifecycle_action_response(self):
    self.autoscaling_backend.complete_lifecycle_action(
        self._get_param("AutoScalingGroupName"), self._get_param("LifecycleHookName"),
        self._get_param("InstanceId"), self._get_param("LifecycleActionResult"))
    return EmptyResult()
responses.AutoScalingResponse.complete_lifecycle_action = complete_lifecycle_action_response

def record_lifecycle_action_heartbeat_response(self):
    self.autoscaling_backend.record_lifecycle_action_heartbeat(
        self._get_param("AutoScalingGroupName"), self._get_param("LifecycleHookName"),
        self._get_param("InstanceId"))
    return EmptyResult()
responses.AutoScalingResponse.record_lifecycle_action_heartbeat = record_lifecycle_action_heartbeat_response

from moto.server import main
main(["-H", "127.0.0.1", "-p", port])
"#;

/// A running moto server (with the launcher's additions), stopped when
/// dropped or when this process ends.
pub struct MotoServer {
    /// `http://127.0.0.1:PORT`, for `endpoint_url`.
    pub url: String,
    /// Held so the launcher's stdin stays open while the server is needed.
    stdin: Mutex<Option<ChildStdin>>,
    child: Mutex<Child>,
}

/// The Python that runs moto: `GRU_TEST_PYTHON`, or the workspace's
/// `.venv/bin/python`.
pub fn python() -> PathBuf {
    match std::env::var_os("GRU_TEST_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python"),
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// One GET over loopback; the status code, if the server answered.
fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(
        &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        Duration::from_secs(1),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

impl MotoServer {
    /// Starts moto on a free loopback port and waits until it answers;
    /// panics with [`INSTALL_HINT`] if it cannot.
    pub fn start() -> MotoServer {
        let python = python();
        let port = free_port();
        let mut child = Command::new(&python)
            .arg("-c")
            .arg(LAUNCHER)
            .arg(port.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}. {INSTALL_HINT}", python.display()));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!("moto exited ({status}) before answering: {err}\n{INSTALL_HINT}");
            }
            if http_status(port, "/moto-api/") == Some(200) {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "moto did not answer on 127.0.0.1:{port} within {START_TIMEOUT:?}. {INSTALL_HINT}"
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Its request log is of no use here; dropping the pipe would make
        // moto fail on its next write, so drain it in the background.
        if let Some(mut stderr) = child.stderr.take() {
            std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
        }
        let stdin = child.stdin.take().expect("piped stdin");
        MotoServer {
            url: format!("http://127.0.0.1:{port}"),
            stdin: Mutex::new(Some(stdin)),
            child: Mutex::new(child),
        }
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        // Closing stdin ends the launcher; kill in case it does not.
        if let Ok(mut stdin) = self.stdin.lock() {
            stdin.take();
        }
        if let Ok(child) = self.child.get_mut() {
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(5) {
                if !matches!(child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Puts every request in one moto account.
#[derive(Clone, Debug)]
pub struct MotoAccount(pub String);

impl Intercept for MotoAccount {
    fn name(&self) -> &'static str {
        "MotoAccount"
    }

    fn modify_before_transmit(
        &self,
        context: &mut BeforeTransmitInterceptorContextMut<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        context
            .request_mut()
            .headers_mut()
            .insert("x-moto-account-id", self.0.clone());
        Ok(())
    }
}

/// A random 12-digit account id: a fresh, empty moto account.
pub fn random_account() -> String {
    let mut rng = rand::rng();
    (0..12)
        .map(|_| char::from(b'0' + rng.random_range(0..10u8)))
        .collect()
}

/// One SDK client for moto account `account` at `url`: static credentials,
/// retries off (moto answers 500 to what it does not implement, and a retry
/// would only hide that), `extra` on every call.
macro_rules! moto_client {
    ($sdk:ident, $url:expr, $account:expr, $extra:expr) => {
        $sdk::Client::from_conf(
            $sdk::Config::builder()
                .behavior_version(BehaviorVersion::latest())
                .http_client(crate::config::https_client())
                .region(Region::new(REGION))
                .credentials_provider(Credentials::new(
                    "moto",
                    "moto",
                    None,
                    None,
                    "gru-aws tests",
                ))
                .endpoint_url($url)
                .retry_config(RetryConfig::disabled())
                .timeout_config(
                    TimeoutConfig::builder()
                        .operation_timeout(Duration::from_secs(30))
                        .build(),
                )
                .interceptor(MotoAccount($account.to_owned()))
                .interceptor($extra)
                .build(),
        )
    };
}

/// SDK clients for moto account `account` at `url`, with `extra` on every
/// call.
pub fn clients(url: &str, account: &str, extra: impl Intercept + Clone + 'static) -> AwsClients {
    AwsClients {
        autoscaling: moto_client!(aws_sdk_autoscaling, url, account, extra.clone()),
        elb: moto_client!(aws_sdk_elasticloadbalancingv2, url, account, extra.clone()),
        ec2: moto_client!(aws_sdk_ec2, url, account, extra),
    }
}

/// An SQS client for moto account `account` at `url`.
pub fn sqs_client(url: &str, account: &str) -> aws_sdk_sqs::Client {
    moto_client!(aws_sdk_sqs, url, account, NoInterceptor)
}

/// A DynamoDB client for moto account `account` at `url`.
pub fn dynamodb_client(url: &str, account: &str) -> aws_sdk_dynamodb::Client {
    moto_client!(aws_sdk_dynamodb, url, account, NoInterceptor)
}

/// An interceptor that does nothing, for [`clients`] without another.
#[derive(Clone, Debug, Default)]
pub struct NoInterceptor;

impl Intercept for NoInterceptor {
    fn name(&self) -> &'static str {
        "NoInterceptor"
    }
}

/// What [`create_fleet`] made.
#[derive(Clone, Debug)]
pub struct MotoFleet {
    pub group: String,
    pub target_group_arn: String,
}

/// In the clients' account: a VPC and subnet, a launch template with a
/// Linux AMI, a target group (TCP, [`ENGINE_PORT`], instance targets) and
/// an Auto Scaling group `gru-fleet` with these bounds, not attached to the
/// target group.
pub async fn create_fleet(clients: &AwsClients, min: i32, max: i32, desired: i32) -> MotoFleet {
    let ec2 = &clients.ec2;
    // The first image moto lists is Windows: pick Amazon Linux by name.
    let images = ec2
        .describe_images()
        .owners("amazon")
        .send()
        .await
        .expect("DescribeImages");
    let ami = images
        .images()
        .iter()
        .find(|i| i.platform().is_none() && i.name().is_some_and(|n| n.starts_with("amzn-ami-hvm")))
        .and_then(|i| i.image_id())
        .expect("moto lists an Amazon Linux HVM image")
        .to_owned();
    let vpc = ec2
        .create_vpc()
        .cidr_block("10.0.0.0/16")
        .send()
        .await
        .expect("CreateVpc")
        .vpc()
        .and_then(|v| v.vpc_id())
        .expect("a VPC id")
        .to_owned();
    let subnet = ec2
        .create_subnet()
        .vpc_id(&vpc)
        .cidr_block("10.0.1.0/24")
        .availability_zone(ZONE)
        .send()
        .await
        .expect("CreateSubnet")
        .subnet()
        .and_then(|s| s.subnet_id())
        .expect("a subnet id")
        .to_owned();
    ec2.create_launch_template()
        .launch_template_name("gru-minion")
        .launch_template_data(
            RequestLaunchTemplateData::builder()
                .image_id(ami)
                .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
                .network_interfaces(
                    LaunchTemplateInstanceNetworkInterfaceSpecificationRequest::builder()
                        .device_index(0)
                        .subnet_id(&subnet)
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .expect("CreateLaunchTemplate");
    let target_group_arn = clients
        .elb
        .create_target_group()
        .name("gru-hl7")
        .protocol(ProtocolEnum::Tcp)
        .port(i32::from(ENGINE_PORT))
        .vpc_id(&vpc)
        .target_type(TargetTypeEnum::Instance)
        .send()
        .await
        .expect("CreateTargetGroup")
        .target_groups()
        .first()
        .and_then(|t| t.target_group_arn())
        .expect("a target group ARN")
        .to_owned();
    let group = "gru-fleet".to_owned();
    clients
        .autoscaling
        .create_auto_scaling_group()
        .auto_scaling_group_name(&group)
        .launch_template(
            LaunchTemplateSpecification::builder()
                .launch_template_name("gru-minion")
                .version("$Latest")
                .build(),
        )
        .min_size(min)
        .max_size(max)
        .desired_capacity(desired)
        .vpc_zone_identifier(&subnet)
        .send()
        .await
        .expect("CreateAutoScalingGroup");
    MotoFleet {
        group,
        target_group_arn,
    }
}

/// `(instance id, port)` of every target in the target group, sorted, as
/// moto lists them.
pub async fn registered_targets(
    clients: &AwsClients,
    target_group_arn: &str,
) -> Vec<(String, i32)> {
    let mut listed: Vec<(String, i32)> = clients
        .elb
        .describe_target_health()
        .target_group_arn(target_group_arn)
        .send()
        .await
        .expect("DescribeTargetHealth")
        .target_health_descriptions()
        .iter()
        .filter_map(|d| d.target())
        .filter_map(|t| Some((t.id()?.to_owned(), t.port()?)))
        .collect();
    listed.sort();
    listed
}
