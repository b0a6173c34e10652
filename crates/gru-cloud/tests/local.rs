//! The local provider against real peers: child processes and TCP on
//! 127.0.0.1. Every test is bounded by [`TEST_TIMEOUT`] and waits on
//! conditions with a deadline, never on a fixed sleep.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gru_cloud::local::{LaunchSpec, LocalGroup, LocalLoadBalancer};
use gru_cloud::{
    CapacityGroup, CloudError, GroupState, InstanceId, InstanceLifecycle, Target, TargetGroup,
    TargetState,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a condition may take to become true.
const WAIT: Duration = Duration::from_secs(10);
/// Long enough that no test sees it end.
const LONG_DELAY: Duration = Duration::from_secs(60);

async fn bounded<F: Future>(test: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("test timed out")
}

/// Polls `probe` until it yields a value; panics naming `what` after [`WAIT`].
async fn eventually<T, Fut>(what: &str, mut probe: impl FnMut() -> Fut) -> T
where
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------- load balancer

/// A target that greets each connection with its one-byte `name`, then echoes.
async fn named_echo_server(name: u8) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                if socket.write_all(&[name]).await.is_ok() {
                    let (mut read, mut write) = socket.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                }
            });
        }
    });
    address
}

fn target(name: &str, address: SocketAddr) -> Target {
    Target {
        instance: InstanceId::from(name),
        address,
    }
}

async fn start_lb(delay: Duration) -> Arc<LocalLoadBalancer> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    LocalLoadBalancer::start(listener, delay)
}

/// Connects through the load balancer; returns the stream and the name of
/// the target it reached.
async fn connect(lb: &LocalLoadBalancer) -> (TcpStream, u8) {
    let mut stream = TcpStream::connect(lb.local_addr()).await.unwrap();
    let mut name = [0u8; 1];
    stream.read_exact(&mut name).await.unwrap();
    (stream, name[0])
}

async fn assert_echoes(stream: &mut TcpStream) {
    stream.write_all(b"ping").await.unwrap();
    let mut reply = [0u8; 4];
    stream.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply, b"ping");
}

/// Asserts the load balancer closes `stream` (EOF or reset).
async fn assert_closed(stream: &mut TcpStream) {
    let mut buf = [0u8; 16];
    match tokio::time::timeout(WAIT, stream.read(&mut buf)).await {
        Ok(Ok(0) | Err(_)) => {}
        Ok(Ok(n)) => panic!("expected the connection closed, read {n} bytes"),
        Err(_) => panic!("connection still open after {WAIT:?}"),
    }
}

fn active(lb: &LocalLoadBalancer, t: &Target) -> Option<u64> {
    lb.targets()
        .into_iter()
        .find(|info| &info.target == t)
        .map(|info| info.active_connections)
}

#[tokio::test]
async fn lb_spreads_by_least_connections() {
    bounded(async {
        let lb = start_lb(LONG_DELAY).await;
        let a = target("i-a", named_echo_server(b'A').await);
        let b = target("i-b", named_echo_server(b'B').await);
        lb.register(&a).await.unwrap();
        lb.register(&b).await.unwrap();
        lb.register(&a).await.unwrap(); // idempotent
        assert_eq!(lb.target_state(&a).await.unwrap(), TargetState::Healthy);

        let mut streams: HashMap<u8, Vec<TcpStream>> = HashMap::new();
        for _ in 0..4 {
            let (mut stream, name) = connect(&lb).await;
            assert_echoes(&mut stream).await;
            streams.entry(name).or_default().push(stream);
        }
        assert_eq!(streams[&b'A'].len(), 2);
        assert_eq!(streams[&b'B'].len(), 2);
        let infos = lb.targets();
        assert_eq!(infos.len(), 2);
        for info in &infos {
            assert_eq!(info.state, TargetState::Healthy);
            assert_eq!(info.active_connections, 2);
            assert_eq!(info.total_connections, 2);
        }

        // A closes one: it now has the fewest, so it gets the next one.
        drop(streams.get_mut(&b'A').unwrap().pop());
        eventually("A to count one connection", || async {
            (active(&lb, &a) == Some(1)).then_some(())
        })
        .await;
        let (mut stream, name) = connect(&lb).await;
        assert_eq!(name, b'A');
        assert_echoes(&mut stream).await;
        assert_eq!(active(&lb, &a), Some(2));
        assert_eq!(active(&lb, &b), Some(2));
    })
    .await;
}

#[tokio::test]
async fn lb_drains_a_deregistered_target() {
    bounded(async {
        let lb = start_lb(LONG_DELAY).await;
        let a = target("i-a", named_echo_server(b'A').await);
        let b = target("i-b", named_echo_server(b'B').await);
        lb.register(&a).await.unwrap();
        lb.register(&b).await.unwrap();

        let (mut lingering, name) = connect(&lb).await;
        let (gone, other) = if name == b'A' { (&a, b'B') } else { (&b, b'A') };
        lb.deregister(gone).await.unwrap();
        assert_eq!(lb.target_state(gone).await.unwrap(), TargetState::Draining);
        lb.deregister(gone).await.unwrap(); // idempotent
        assert_eq!(lb.target_state(gone).await.unwrap(), TargetState::Draining);

        // No new connection goes to the draining target...
        let mut fresh = Vec::new();
        for _ in 0..3 {
            let (mut stream, name) = connect(&lb).await;
            assert_eq!(name, other);
            assert_echoes(&mut stream).await;
            fresh.push(stream);
        }
        // ...while its existing one still works.
        assert_echoes(&mut lingering).await;
        assert_eq!(active(&lb, gone), Some(1));

        // When that connection closes, the target is out.
        drop(lingering);
        eventually("the drained target to become unused", || async {
            (lb.target_state(gone).await.unwrap() == TargetState::Unused).then_some(())
        })
        .await;
        assert!(lb.targets().iter().all(|info| &info.target != gone));
        for stream in &mut fresh {
            assert_echoes(stream).await;
        }
    })
    .await;
}

#[tokio::test]
async fn lb_cuts_connections_when_the_delay_ends() {
    bounded(async {
        let delay = Duration::from_millis(200);
        let lb = start_lb(delay).await;
        let a = target("i-a", named_echo_server(b'A').await);
        lb.register(&a).await.unwrap();
        let (mut lingering, name) = connect(&lb).await;
        assert_eq!(name, b'A');

        let deregistered = Instant::now();
        lb.deregister(&a).await.unwrap();
        assert_eq!(lb.target_state(&a).await.unwrap(), TargetState::Draining);
        assert_echoes(&mut lingering).await;

        // With no healthy target, a new client is turned away.
        let mut refused = TcpStream::connect(lb.local_addr()).await.unwrap();
        assert_closed(&mut refused).await;

        eventually("the delay to end the drain", || async {
            (lb.target_state(&a).await.unwrap() == TargetState::Unused).then_some(())
        })
        .await;
        assert!(deregistered.elapsed() >= delay);
        assert!(lb.targets().is_empty());
        assert_closed(&mut lingering).await;
    })
    .await;
}

#[tokio::test]
async fn lb_skips_unreachable_targets_and_reregisters_draining_ones() {
    bounded(async {
        let lb = start_lb(LONG_DELAY).await;
        let dead_address = {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            listener.local_addr().unwrap()
        };
        let dead = target("i-dead", dead_address);
        let a = target("i-a", named_echo_server(b'A').await);
        lb.register(&dead).await.unwrap();
        lb.register(&a).await.unwrap();

        let mut streams = Vec::new();
        for _ in 0..3 {
            let (mut stream, name) = connect(&lb).await;
            assert_eq!(name, b'A');
            assert_echoes(&mut stream).await;
            streams.push(stream);
        }
        let dead_info = lb
            .targets()
            .into_iter()
            .find(|info| info.target == dead)
            .unwrap();
        assert_eq!(dead_info.active_connections, 0);
        assert_eq!(dead_info.total_connections, 0);

        // Deregistering a target without connections removes it at once.
        lb.deregister(&dead).await.unwrap();
        assert_eq!(lb.target_state(&dead).await.unwrap(), TargetState::Unused);

        // Registering a draining target makes it healthy again.
        lb.deregister(&a).await.unwrap();
        assert_eq!(lb.target_state(&a).await.unwrap(), TargetState::Draining);
        lb.register(&a).await.unwrap();
        assert_eq!(lb.target_state(&a).await.unwrap(), TargetState::Healthy);
        let (mut stream, name) = connect(&lb).await;
        assert_eq!(name, b'A');
        assert_echoes(&mut stream).await;

        let unknown = target("i-unknown", dead_address);
        assert_eq!(
            lb.target_state(&unknown).await.unwrap(),
            TargetState::Unused
        );
        lb.deregister(&unknown).await.unwrap();

        // Shutdown cuts what is open and stops listening.
        lb.shutdown();
        assert_closed(&mut stream).await;
        for stream in &mut streams {
            assert_closed(stream).await;
        }
        eventually("the listener to close", || async {
            TcpStream::connect(lb.local_addr())
                .await
                .is_err()
                .then_some(())
        })
        .await;
    })
    .await;
}

// ---------------------------------------------------------------- capacity group

/// `sh -c SCRIPT sh --instance-id ID`: the instance id arrives as `$2`.
fn shell_spec(script: &str, log_dir: Option<&Path>, stop_grace: Duration) -> LaunchSpec {
    LaunchSpec {
        program: PathBuf::from("/bin/sh"),
        args: vec!["-c".into(), script.into(), "sh".into()],
        env: vec![("GRU_TEST_MARK".into(), "marked".into())],
        log_dir: log_dir.map(Path::to_path_buf),
        stop_grace,
    }
}

/// Each instance logs its id, pid and the environment mark, then becomes
/// `sleep` (same pid).
const SLEEPER: &str = r#"echo "started $2 $$ $GRU_TEST_MARK"; exec sleep 600"#;

/// True when `pid` has exited and been reaped.
fn reaped(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// True when `pid` has exited (reaped, or a zombie whose reaper is not us).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

async fn state(group: &LocalGroup) -> GroupState {
    group.describe().await.unwrap()
}

/// Waits until the group runs exactly `n` instances, all in service.
async fn in_service(group: &LocalGroup, n: usize) -> Vec<InstanceId> {
    eventually(&format!("{n} instances in service"), || async {
        let state = state(group).await;
        let ready = state.instances.len() == n
            && state
                .instances
                .iter()
                .all(|i| i.lifecycle == InstanceLifecycle::InService)
            && group.running_pids().len() == n;
        ready.then(|| state.instances.into_iter().map(|i| i.id).collect())
    })
    .await
}

/// The pid an instance logged when it started.
async fn logged_pid(log_dir: &Path, id: &InstanceId) -> u32 {
    let path = log_dir.join(format!("{id}.log"));
    let line = eventually(&format!("{} to be written", path.display()), || async {
        std::fs::read_to_string(&path)
            .ok()
            .filter(|s| s.ends_with('\n'))
    })
    .await;
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[0], "started");
    assert_eq!(fields[1], id.0, "the instance got its --instance-id");
    assert_eq!(fields[3], "marked", "the instance got the spec's env");
    fields[2].parse().unwrap()
}

#[tokio::test]
async fn group_terminate_with_decrement_lowers_desired_once() {
    bounded(async {
        let logs = tempfile::tempdir().unwrap();
        let group = LocalGroup::start(
            "decrement",
            shell_spec(SLEEPER, Some(logs.path()), Duration::from_secs(5)),
            0,
            3,
            2,
        );
        let ids = in_service(&group, 2).await;
        let mut pids = Vec::new();
        for id in &ids {
            let pid = logged_pid(logs.path(), id).await;
            assert!(group.running_pids().contains(&pid));
            assert!(!exited(pid));
            pids.push(pid);
        }

        let (victim, survivor) = (&ids[0], &ids[1]);
        group.terminate(victim, true).await.unwrap();
        group.terminate(victim, true).await.unwrap();
        let after = state(&group).await;
        assert_eq!(after.desired, 1);
        assert!(
            after
                .instances
                .iter()
                .all(|i| &i.id != victim || i.lifecycle == InstanceLifecycle::Terminating)
        );

        eventually("the victim to be gone", || async {
            let state = state(&group).await;
            (state.instances.iter().all(|i| &i.id != victim) && reaped(pids[0])).then_some(())
        })
        .await;
        let after = state(&group).await;
        assert_eq!(after.desired, 1);
        assert_eq!(after.instances.len(), 1, "no replacement after decrement");
        assert_eq!(&after.instances[0].id, survivor);
        assert_eq!(group.running_pids(), vec![pids[1]]);

        // Gone: still a no-op, never a second decrement.
        group.terminate(victim, true).await.unwrap();
        assert_eq!(state(&group).await.desired, 1);

        let unknown = InstanceId::from("i-local-nope");
        assert!(matches!(
            group.terminate(&unknown, true).await,
            Err(CloudError::NotFound { .. })
        ));

        group.shutdown().await;
        assert!(reaped(pids[1]));
    })
    .await;
}

#[tokio::test]
async fn group_replaces_a_child_that_dies() {
    bounded(async {
        let logs = tempfile::tempdir().unwrap();
        let group = LocalGroup::start(
            "replace",
            shell_spec(SLEEPER, Some(logs.path()), Duration::from_secs(5)),
            1,
            1,
            1,
        );
        let first = in_service(&group, 1).await.remove(0);
        let pid = logged_pid(logs.path(), &first).await;

        let killed = tokio::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .await
            .unwrap();
        assert!(killed.success());

        let replacement = eventually("a replacement instance", || async {
            let state = state(&group).await;
            match state.instances.as_slice() {
                [only] if only.id != first && only.lifecycle == InstanceLifecycle::InService => {
                    Some(only.id.clone())
                }
                _ => None,
            }
        })
        .await;
        assert!(replacement > first, "instance ids are never reused");
        assert_eq!(state(&group).await.desired, 1);
        eventually("the killed child to be reaped", || async {
            reaped(pid).then_some(())
        })
        .await;
        let new_pid = logged_pid(logs.path(), &replacement).await;
        assert_eq!(group.running_pids(), vec![new_pid]);
        group.shutdown().await;
        assert!(reaped(new_pid));
    })
    .await;
}

#[tokio::test]
async fn group_enforces_its_bounds() {
    bounded(async {
        let group = LocalGroup::start(
            "bounds",
            shell_spec("exec sleep 600", None, Duration::from_secs(5)),
            1,
            2,
            1,
        );
        let first = in_service(&group, 1).await.remove(0);

        assert!(matches!(
            group.set_desired(3).await,
            Err(CloudError::OutOfBounds {
                desired: 3,
                min: 1,
                max: 2
            })
        ));
        assert!(matches!(
            group.set_desired(0).await,
            Err(CloudError::OutOfBounds {
                desired: 0,
                min: 1,
                max: 2
            })
        ));
        // The minimum blocks a decrement, and nothing happens.
        assert!(matches!(
            group.terminate(&first, true).await,
            Err(CloudError::OutOfBounds {
                desired: 0,
                min: 1,
                max: 2
            })
        ));
        let unchanged = state(&group).await;
        assert_eq!(unchanged.desired, 1);
        assert_eq!(unchanged.instances.len(), 1);
        assert_eq!(
            unchanged.instances[0].lifecycle,
            InstanceLifecycle::InService
        );

        // Lowering desired terminates the newest instance.
        group.set_desired(2).await.unwrap();
        let both = in_service(&group, 2).await;
        assert_eq!(both[0], first);
        group.set_desired(1).await.unwrap();
        eventually("the newest instance to go", || async {
            let ids: Vec<InstanceId> = state(&group)
                .await
                .instances
                .into_iter()
                .map(|i| i.id)
                .collect();
            (ids == [first.clone()]).then_some(())
        })
        .await;

        group.shutdown().await;
        assert!(group.set_desired(1).await.is_err());
    })
    .await;
}

#[tokio::test]
async fn group_terminate_without_decrement_is_replaced() {
    bounded(async {
        let group = LocalGroup::start(
            "no-decrement",
            shell_spec("exec sleep 600", None, Duration::from_secs(5)),
            0,
            2,
            1,
        );
        let first = in_service(&group, 1).await.remove(0);
        group.terminate(&first, false).await.unwrap();
        let replacement = eventually("a replacement", || async {
            let ids: Vec<InstanceId> = state(&group)
                .await
                .instances
                .into_iter()
                .map(|i| i.id)
                .collect();
            (ids.len() == 1 && ids[0] != first).then(|| ids[0].clone())
        })
        .await;
        assert!(replacement > first);
        assert_eq!(state(&group).await.desired, 1);
        group.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn group_kills_a_child_that_ignores_sigterm() {
    bounded(async {
        let grace = Duration::from_millis(300);
        let group = LocalGroup::start(
            "stubborn",
            // An ignored signal stays ignored across exec.
            shell_spec("trap '' TERM; exec sleep 600", None, grace),
            0,
            1,
            1,
        );
        let id = in_service(&group, 1).await.remove(0);
        let pid = group.running_pids()[0];
        let asked = Instant::now();
        group.terminate(&id, true).await.unwrap();
        eventually("the stubborn child to be killed", || async {
            (state(&group).await.instances.is_empty() && reaped(pid)).then_some(())
        })
        .await;
        assert!(asked.elapsed() >= grace);
        group.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn group_shutdown_leaves_no_child() {
    bounded(async {
        let group = LocalGroup::start(
            "shutdown",
            shell_spec("exec sleep 600", None, Duration::from_secs(5)),
            0,
            3,
            3,
        );
        in_service(&group, 3).await;
        let pids = group.running_pids();
        assert_eq!(pids.len(), 3);
        group.shutdown().await;
        for pid in pids {
            assert!(reaped(pid), "child {pid} survived shutdown");
        }
        assert!(state(&group).await.instances.is_empty());
        assert!(group.running_pids().is_empty());
        group.shutdown().await; // idempotent
    })
    .await;
}

#[tokio::test]
async fn group_survives_a_program_that_cannot_start() {
    bounded(async {
        let group = LocalGroup::start(
            "missing",
            LaunchSpec::new("/nonexistent/gru-test-program"),
            0,
            1,
            1,
        );
        let state = state(&group).await;
        assert_eq!(state.desired, 1);
        assert!(
            state
                .instances
                .iter()
                .all(|i| i.lifecycle == InstanceLifecycle::Pending)
        );
        group.shutdown().await;
        assert!(group.running_pids().is_empty());
    })
    .await;
}

// No orphans when the owner dies is tested end to end: tests/e2e kills
// `gru dev` with SIGKILL and checks its minion processes exit.
