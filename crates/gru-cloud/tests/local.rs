//! The local provider against real peers: child processes and TCP on
//! 127.0.0.1. Every test is bounded by [`TEST_TIMEOUT`] and waits on
//! conditions with a deadline, never on a fixed sleep.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gru_cloud::local::{LaunchSpec, LocalGroup, LocalLoadBalancer};
use gru_cloud::{
    CapacityGroup, CloudError, GroupState, InstanceId, InstanceLifecycle, Target, TargetGroup,
    TargetState,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
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

/// A registered engine (a listener the test accepts on) and one client
/// connected to it through the load balancer: `(client, engine side)`.
async fn connect_to_engine(lb: &LocalLoadBalancer, name: &str) -> (Target, TcpStream, TcpStream) {
    let engine = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let t = target(name, engine.local_addr().unwrap());
    lb.register(&t).await.unwrap();
    let mut client = TcpStream::connect(lb.local_addr()).await.unwrap();
    let (mut accepted, _) = tokio::time::timeout(WAIT, engine.accept())
        .await
        .expect("the load balancer to connect to the engine")
        .unwrap();
    // A message goes through, as MLLP senders start.
    client.write_all(b"MSG").await.unwrap();
    let mut message = [0u8; 3];
    accepted.read_exact(&mut message).await.unwrap();
    assert_eq!(&message, b"MSG");
    assert_eq!(active(lb, &t), Some(1));
    (t, client, accepted)
}

#[tokio::test]
async fn lb_closes_the_client_side_when_the_engine_closes() {
    bounded(async {
        let lb = start_lb(LONG_DELAY).await;
        let (engine, mut client, mut accepted) = connect_to_engine(&lb, "i-engine").await;

        // The drain: out of the load balancer, then the engine sends its
        // last ACK and closes at the message boundary. The sender stays
        // idle, holding its socket open.
        lb.deregister(&engine).await.unwrap();
        assert_eq!(
            lb.target_state(&engine).await.unwrap(),
            TargetState::Draining
        );
        accepted.write_all(b"ACK").await.unwrap();
        drop(accepted);

        // The connection stops counting without the client doing anything
        // (the deregistration delay is far away)...
        eventually("the drained target to become unused", || async {
            (lb.target_state(&engine).await.unwrap() == TargetState::Unused).then_some(())
        })
        .await;
        // ...and the client still gets the ACK, then end-of-stream.
        let mut received = Vec::new();
        tokio::time::timeout(WAIT, client.read_to_end(&mut received))
            .await
            .expect("the client connection to be closed")
            .expect("a clean close, not a reset");
        assert_eq!(received, b"ACK");
    })
    .await;
}

#[tokio::test]
async fn lb_closes_the_engine_side_when_the_client_closes() {
    bounded(async {
        let lb = start_lb(LONG_DELAY).await;
        let (engine, client, mut accepted) = connect_to_engine(&lb, "i-engine").await;

        drop(client);
        // The engine sees end-of-stream at once...
        let mut rest = Vec::new();
        tokio::time::timeout(WAIT, accepted.read_to_end(&mut rest))
            .await
            .expect("the engine side to see the client's close")
            .unwrap();
        assert!(rest.is_empty());
        // ...and even an engine that keeps its side open stops counting.
        eventually("the connection to stop counting", || async {
            (active(&lb, &engine) == Some(0)).then_some(())
        })
        .await;
        assert_eq!(
            lb.target_state(&engine).await.unwrap(),
            TargetState::Healthy
        );
        drop(accepted);
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
        state_file: None,
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

// ---------------------------------------------------------------- adoption

/// The group name the adoption tests record their instances under.
const ADOPT_GROUP: &str = "adopt";

/// Set only in the copy of this binary that an adoption test runs as a
/// stand-in controller (see [`adoption_host`]): the directory holding the
/// state file and the instances' logs.
const HOST_DIR_ENV: &str = "GRU_CLOUD_TEST_HOST_DIR";

/// What the stand-in controller prints once its instances are in service.
const HOST_READY: &str = "gru-test-host-ready";

/// Sleepers that record themselves in `<dir>/local.json` and log to
/// `<dir>/logs`.
fn adoption_spec(dir: &Path) -> LaunchSpec {
    let mut spec = shell_spec(SLEEPER, Some(&dir.join("logs")), Duration::from_secs(5));
    spec.state_file = Some(dir.join("local.json"));
    spec
}

/// Not a test by itself: the stand-in controller of the adoption tests,
/// which run it in a copy of this binary and kill it with SIGKILL. It starts
/// a group of two instances on the state file in `$GRU_CLOUD_TEST_HOST_DIR`,
/// says so on stdout, and then waits to be killed. Without that variable it
/// does nothing.
#[tokio::test]
async fn adoption_host() {
    let Some(dir) = std::env::var_os(HOST_DIR_ENV) else {
        return;
    };
    let group = LocalGroup::try_start(ADOPT_GROUP, adoption_spec(Path::new(&dir)), 0, 3, 2)
        .expect("state file usable");
    in_service(&group, 2).await;
    println!("{HOST_READY}");
    // Should the test that started us die instead of killing us, our stdin
    // closes: then (or after the test's own time limit) stop cleanly.
    let (closed_tx, closed) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let _ = std::io::Read::read(&mut std::io::stdin(), &mut [0u8; 1]);
        let _ = closed_tx.send(());
    });
    let _ = tokio::time::timeout(TEST_TIMEOUT, closed).await;
    group.shutdown().await;
}

/// Runs [`adoption_host`] on `dir` until its two instances are in service;
/// returns it and its instances (id and pid), in launch order.
async fn start_host(dir: &Path) -> (tokio::process::Child, Vec<(InstanceId, u32)>) {
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let mut host = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "adoption_host",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HOST_DIR_ENV, dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(host.stdout.take().unwrap()).lines();
    tokio::time::timeout(WAIT, async {
        loop {
            match lines.next_line().await.unwrap() {
                Some(line) if line.contains(HOST_READY) => break,
                Some(_) => {}
                None => panic!("the stand-in controller ended before its instances ran"),
            }
        }
    })
    .await
    .expect("the stand-in controller to start two instances");
    let mut ids: Vec<InstanceId> = std::fs::read_dir(&logs)
        .unwrap()
        .map(|entry| {
            let name = entry.unwrap().file_name().into_string().unwrap();
            InstanceId(name.strip_suffix(".log").unwrap().to_owned())
        })
        .collect();
    ids.sort_by_key(number);
    assert_eq!(ids.len(), 2);
    let mut instances = Vec::new();
    for id in ids {
        let pid = logged_pid(&logs, &id).await;
        instances.push((id, pid));
    }
    (host, instances)
}

/// Kills the stand-in controller as a crash would: SIGKILL, no chance to
/// stop anything.
async fn kill_host(mut host: tokio::process::Child) {
    host.start_kill().unwrap();
    host.wait().await.unwrap();
}

/// The instance number in an id (`i-local-0012` → 12).
fn number(id: &InstanceId) -> u64 {
    id.0.rsplit('-').next().unwrap().parse().unwrap()
}

/// `/proc/<pid>/stat` field 22, the start time, while the process exists.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Kills, when dropped, the process groups of the instances it was told
/// about that still run (the same process: same pid and start time), so a
/// failing test leaves nothing behind now that instances outlive groups.
#[derive(Default)]
struct KillLeftovers(Vec<(u32, u64)>);

impl KillLeftovers {
    fn watch(&mut self, pid: u32) {
        let started = start_time(pid).expect("a running instance");
        self.0.push((pid, started));
    }
}

impl Drop for KillLeftovers {
    fn drop(&mut self) {
        for &(pid, started) in &self.0 {
            if !exited(pid) && start_time(pid) == Some(started) {
                let _ = std::process::Command::new("kill")
                    .args(["-s", "KILL", "--", &format!("-{pid}")])
                    .status();
            }
        }
    }
}

#[tokio::test]
async fn group_adopts_its_instances_after_the_controller_is_killed() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let mut leftovers = KillLeftovers::default();
        let (host, old) = start_host(dir.path()).await;
        for (_, pid) in &old {
            leftovers.watch(*pid);
        }
        kill_host(host).await;
        for (id, pid) in &old {
            assert!(!exited(*pid), "{id} died with its controller");
        }

        let group = LocalGroup::try_start(ADOPT_GROUP, adoption_spec(dir.path()), 0, 3, 2)
            .expect("state file usable");
        let adopted = state(&group).await;
        assert_eq!(adopted.desired, 2);
        let listed: Vec<(InstanceId, InstanceLifecycle)> = adopted
            .instances
            .iter()
            .map(|i| (i.id.clone(), i.lifecycle))
            .collect();
        let expected: Vec<(InstanceId, InstanceLifecycle)> = old
            .iter()
            .map(|(id, _)| (id.clone(), InstanceLifecycle::InService))
            .collect();
        assert_eq!(listed, expected, "the same instances, in service");
        let mut pids = group.running_pids();
        pids.sort_unstable();
        let mut old_pids: Vec<u32> = old.iter().map(|(_, pid)| *pid).collect();
        old_pids.sort_unstable();
        assert_eq!(pids, old_pids, "the same processes");

        // A new instance gets a number no earlier controller used.
        group.set_desired(3).await.unwrap();
        let all = in_service(&group, 3).await;
        assert_eq!(&all[..2], &[old[0].0.clone(), old[1].0.clone()]);
        let fresh = &all[2];
        assert!(number(fresh) > number(&old[1].0), "{fresh} reuses a number");
        let fresh_pid = logged_pid(&dir.path().join("logs"), fresh).await;
        leftovers.watch(fresh_pid);

        // An adopted instance stops like a child, and leaves the group only
        // once its process is gone.
        let (victim, victim_pid) = &old[0];
        group.terminate(victim, true).await.unwrap();
        assert_eq!(state(&group).await.desired, 2);
        eventually("the adopted victim to leave the group", || async {
            state(&group)
                .await
                .instances
                .iter()
                .all(|i| &i.id != victim)
                .then_some(())
        })
        .await;
        assert!(exited(*victim_pid), "{victim} left the group still running");
        group.terminate(victim, true).await.unwrap();
        let after = state(&group).await;
        assert_eq!(after.desired, 2, "decremented once");
        let ids: Vec<InstanceId> = after.instances.into_iter().map(|i| i.id).collect();
        assert_eq!(ids, [old[1].0.clone(), fresh.clone()], "no replacement");

        group.shutdown().await;
        for pid in [old[1].1, fresh_pid] {
            assert!(exited(pid), "{pid} survived shutdown");
        }
        assert!(state(&group).await.instances.is_empty());

        // The file lists nothing now: a group started on it adopts nothing.
        let next = LocalGroup::try_start(ADOPT_GROUP, adoption_spec(dir.path()), 0, 3, 0)
            .expect("state file usable");
        let empty = state(&next).await;
        assert!(empty.instances.is_empty());
        assert_eq!(empty.desired, 0);
        next.shutdown().await;
    })
    .await;
}

/// Makes the record of `pid` in the state file name a process that started
/// at another time: what a recycled pid looks like.
fn tamper_start_time(state_file: &Path, pid: u32) {
    let text = std::fs::read_to_string(state_file).unwrap();
    let mut doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let record = doc["groups"][ADOPT_GROUP]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|r| r["pid"] == pid)
        .unwrap();
    let started = record["start_time"].as_u64().unwrap();
    record["start_time"] = (started + 1).into();
    std::fs::write(state_file, serde_json::to_vec(&doc).unwrap()).unwrap();
}

#[tokio::test]
async fn group_adopts_no_dead_or_recycled_pid() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let mut leftovers = KillLeftovers::default();
        let (host, old) = start_host(dir.path()).await;
        for (_, pid) in &old {
            leftovers.watch(*pid);
        }
        kill_host(host).await;
        let ((dead, dead_pid), (recycled, recycled_pid)) = (&old[0], &old[1]);

        // One instance dies while no controller runs...
        let killed = std::process::Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{dead_pid}")])
            .status()
            .unwrap();
        assert!(killed.success());
        eventually("the instance to die", || async {
            exited(*dead_pid).then_some(())
        })
        .await;
        // ...and the other's pid now names a process started at another time.
        tamper_start_time(&dir.path().join("local.json"), *recycled_pid);

        let group = LocalGroup::try_start(ADOPT_GROUP, adoption_spec(dir.path()), 0, 3, 0)
            .expect("state file usable");
        let adopted = state(&group).await;
        assert!(adopted.instances.is_empty(), "adopted {adopted:?}");
        assert_eq!(adopted.desired, 0);
        assert!(group.running_pids().is_empty());
        // Gone as far as the group knows: terminating them changes nothing.
        group.terminate(dead, true).await.unwrap();
        group.terminate(recycled, false).await.unwrap();
        assert_eq!(state(&group).await.desired, 0);

        // Numbers continue after the recorded ones, adopted or not.
        group.set_desired(1).await.unwrap();
        let fresh = in_service(&group, 1).await.remove(0);
        assert!(number(&fresh) > number(recycled), "{fresh} reuses a number");
        leftovers.watch(group.running_pids()[0]);

        group.shutdown().await;
        assert!(
            !exited(*recycled_pid),
            "a process whose start time did not match was signalled"
        );
    })
    .await;
}
