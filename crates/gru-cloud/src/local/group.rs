//! [`LocalGroup`]: a capacity group whose instances are child processes.
//!
//! One supervisor task per group keeps the number of instances that are not
//! terminating equal to the desired capacity, the way an Auto Scaling group
//! does. Each child is owned by its own instance task, which reaps it and is
//! the only place that signals it (so a signal never reaches a recycled pid).
//! Children are forked by a dedicated launcher thread; see
//! [`sys::die_with_parent`] for why the forking thread matters.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, mpsc};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use tokio::process::{Child, Command};
use tokio::sync::{Notify, oneshot, watch};
use tracing::{Instrument, debug, info, info_span, warn};

use super::sys;
use crate::{CapacityGroup, CloudError, GroupState, Instance, InstanceId, InstanceLifecycle};

/// How long a child has to exit after SIGTERM before it gets SIGKILL, unless
/// the [`LaunchSpec`] says otherwise.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);

/// Delay before retrying after the first failed launch; it doubles with each
/// consecutive failure up to [`LAUNCH_BACKOFF_MAX`].
const LAUNCH_BACKOFF_MIN: Duration = Duration::from_millis(100);
const LAUNCH_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// A child that exits on its own sooner than this after launch counts as a
/// failed launch, so a program that crashes at start is relaunched with
/// backoff rather than in a tight loop.
const MIN_HEALTHY_RUN: Duration = Duration::from_secs(1);

/// Instance numbers are process-wide rather than per group so that two local
/// fleets in one `gru dev` never hand the controller the same instance id.
static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);

/// What to run for each instance of a [`LocalGroup`].
///
/// Every instance runs `program args… --instance-id <id>`.
#[derive(Clone, Debug)]
pub struct LaunchSpec {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Added to the controller's own environment.
    pub env: Vec<(OsString, OsString)>,
    /// Each instance's stdout and stderr go to `<log_dir>/<instance-id>.log`;
    /// `None` inherits the controller's.
    pub log_dir: Option<PathBuf>,
    /// Time between SIGTERM and SIGKILL when an instance is stopped.
    pub stop_grace: Duration,
}

impl LaunchSpec {
    /// Runs `program` with no extra arguments or environment, logs inherited
    /// and [`DEFAULT_STOP_GRACE`].
    pub fn new(program: impl Into<PathBuf>) -> Self {
        LaunchSpec {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            log_dir: None,
            stop_grace: DEFAULT_STOP_GRACE,
        }
    }
}

/// A capacity group whose instances are child processes of this one.
///
/// Dropping the last handle stops every child (SIGTERM, then SIGKILL after
/// the grace period) without waiting; [`LocalGroup::shutdown`] waits.
pub struct LocalGroup {
    inner: Arc<Inner>,
    /// Becomes true when the supervisor has exited, which it does only once
    /// every child is gone.
    done: watch::Receiver<bool>,
}

struct Inner {
    name: String,
    spec: LaunchSpec,
    state: Mutex<State>,
    /// Wakes the supervisor: the desired capacity changed, an instance ended
    /// or shutdown began.
    wake: Notify,
}

struct State {
    desired: u32,
    min: u32,
    max: u32,
    members: HashMap<InstanceId, Member>,
    /// Instances that were members once: terminating them again is a no-op,
    /// not `NotFound`.
    retired: HashSet<InstanceId>,
    /// Shutdown began: launch nothing more.
    stopping: bool,
    /// Consecutive failed launches, for the backoff.
    failures: u32,
    /// No launch before this instant (set after a failure).
    retry_at: Option<Instant>,
}

struct Member {
    /// Launch order; the newest instance has the highest.
    seq: u64,
    lifecycle: InstanceLifecycle,
    launched_at: SystemTime,
    /// `None` while the child is being spawned.
    pid: Option<u32>,
    /// Set to true to make the instance task stop the child.
    stop: watch::Sender<bool>,
}

impl State {
    fn active(&self) -> usize {
        self.members
            .values()
            .filter(|m| m.lifecycle != InstanceLifecycle::Terminating)
            .count()
    }

    fn desired(&self) -> usize {
        usize::try_from(self.desired).unwrap_or(usize::MAX)
    }

    /// Marks `id` terminating and tells its task to stop the child.
    fn begin_terminate(&mut self, id: &InstanceId) {
        if let Some(member) = self.members.get_mut(id) {
            member.lifecycle = InstanceLifecycle::Terminating;
            member.stop.send_replace(true);
        }
    }

    /// Terminates the newest instances while more are active than desired,
    /// as an Auto Scaling group does when its desired capacity is lowered.
    fn terminate_excess(&mut self) {
        while self.active() > self.desired() {
            let newest = self
                .members
                .iter()
                .filter(|(_, m)| m.lifecycle != InstanceLifecycle::Terminating)
                .max_by_key(|(_, m)| m.seq)
                .map(|(id, _)| id.clone());
            let Some(id) = newest else { break };
            info!(instance = %id, "terminating newest instance above desired capacity");
            self.begin_terminate(&id);
        }
    }

    fn record_failure(&mut self) {
        self.failures = self.failures.saturating_add(1);
        self.retry_at = Some(Instant::now() + backoff(self.failures));
    }
}

/// The pause after `failures` consecutive failed launches.
fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    LAUNCH_BACKOFF_MIN
        .saturating_mul(1 << doublings)
        .min(LAUNCH_BACKOFF_MAX)
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent before anything
        // that could panic, so a poisoned lock holds usable state.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn begin_shutdown(&self) {
        let mut state = self.lock();
        if !state.stopping {
            info!(group = %self.name, "stopping every instance");
            state.stopping = true;
        }
        let ids: Vec<InstanceId> = state.members.keys().cloned().collect();
        for id in &ids {
            state.begin_terminate(id);
        }
        drop(state);
        self.wake.notify_one();
    }

    fn command(&self, id: &InstanceId) -> io::Result<Command> {
        let spec = &self.spec;
        let mut cmd = Command::new(&spec.program);
        cmd.args(&spec.args)
            .arg("--instance-id")
            .arg(&id.0)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            // Under systemd the controller's readiness socket is its own:
            // minions must not report to it.
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            // Its own process group, so stopping an instance reaches the
            // processes it started too.
            .process_group(0)
            .kill_on_drop(true);
        if let Some(dir) = &spec.log_dir {
            let log = OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(format!("{id}.log")))?;
            cmd.stdout(log.try_clone()?).stderr(log);
        }
        sys::die_with_parent(&mut cmd);
        Ok(cmd)
    }
}

impl LocalGroup {
    /// Starts a group and its supervisor task, which launches `desired`
    /// instances right away (`desired` is clamped into `min..=max`). Must be
    /// called within a tokio runtime.
    pub fn start(name: &str, spec: LaunchSpec, min: u32, max: u32, desired: u32) -> Arc<Self> {
        let desired = desired.clamp(min, max.max(min));
        let inner = Arc::new(Inner {
            name: name.to_owned(),
            spec,
            state: Mutex::new(State {
                desired,
                min,
                max,
                members: HashMap::new(),
                retired: HashSet::new(),
                stopping: false,
                failures: 0,
                retry_at: None,
            }),
            wake: Notify::new(),
        });
        let (done_tx, done) = watch::channel(false);
        let span = info_span!("local_group", group = %name);
        tokio::spawn(supervise(Arc::clone(&inner), done_tx).instrument(span));
        Arc::new(LocalGroup { inner, done })
    }

    /// Stops launching, stops every child (SIGTERM, SIGKILL after the grace
    /// period) and returns when all have exited and been reaped.
    pub async fn shutdown(&self) {
        self.inner.begin_shutdown();
        let mut done = self.done.clone();
        // An error means the supervisor is gone too (its runtime is shutting
        // down); there is nothing left to wait for.
        let _ = done.wait_for(|d| *d).await;
    }

    /// Pids of the children currently running, terminating ones included.
    pub fn running_pids(&self) -> Vec<u32> {
        self.inner
            .lock()
            .members
            .values()
            .filter_map(|m| m.pid)
            .collect()
    }
}

impl Drop for LocalGroup {
    fn drop(&mut self) {
        self.inner.begin_shutdown();
    }
}

#[async_trait]
impl CapacityGroup for LocalGroup {
    async fn describe(&self) -> Result<GroupState, CloudError> {
        let state = self.inner.lock();
        let mut members: Vec<(&InstanceId, &Member)> = state.members.iter().collect();
        members.sort_by_key(|(_, m)| m.seq);
        Ok(GroupState {
            desired: state.desired,
            min: state.min,
            max: state.max,
            instances: members
                .into_iter()
                .map(|(id, m)| Instance {
                    id: id.clone(),
                    lifecycle: m.lifecycle,
                    launched_at: m.launched_at,
                })
                .collect(),
        })
    }

    async fn set_desired(&self, desired: u32) -> Result<(), CloudError> {
        let mut state = self.inner.lock();
        if desired < state.min || desired > state.max {
            return Err(CloudError::OutOfBounds {
                desired,
                min: state.min,
                max: state.max,
            });
        }
        if state.stopping {
            return Err(CloudError::Provider {
                call: "set_desired",
                message: format!("group {} is shut down", self.inner.name),
            });
        }
        if state.desired != desired {
            info!(group = %self.inner.name, from = state.desired, to = desired, "desired capacity set");
        }
        state.desired = desired;
        state.terminate_excess();
        drop(state);
        self.inner.wake.notify_one();
        Ok(())
    }

    async fn terminate(&self, id: &InstanceId, decrement: bool) -> Result<(), CloudError> {
        let mut state = self.inner.lock();
        let Some(member) = state.members.get(id) else {
            if state.retired.contains(id) {
                return Ok(());
            }
            return Err(CloudError::NotFound {
                what: format!("instance {id} in group {}", self.inner.name),
            });
        };
        if member.lifecycle == InstanceLifecycle::Terminating {
            return Ok(());
        }
        if decrement {
            // Active instances never outnumber the desired capacity, so an
            // active member means desired >= 1.
            if state.desired <= state.min {
                return Err(CloudError::OutOfBounds {
                    desired: state.desired.saturating_sub(1),
                    min: state.min,
                    max: state.max,
                });
            }
            state.desired -= 1;
        }
        info!(group = %self.inner.name, instance = %id, decrement, desired = state.desired, "terminating instance");
        state.begin_terminate(id);
        drop(state);
        self.inner.wake.notify_one();
        Ok(())
    }
}

/// What the supervisor does next.
enum Step {
    Launch(InstanceId, watch::Receiver<bool>),
    /// Sleep until woken, or until the instant (a launch retry) passes.
    Wait(Option<Instant>),
    Exit,
}

async fn supervise(inner: Arc<Inner>, done: watch::Sender<bool>) {
    let mut launcher: Option<Launcher> = None;
    loop {
        match next_step(&inner) {
            Step::Exit => break,
            Step::Wait(until) => {
                let retry = async {
                    match until {
                        Some(at) => tokio::time::sleep_until(at.into()).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = inner.wake.notified() => {}
                    () = retry => {}
                }
            }
            Step::Launch(id, stop) => launch(&inner, &mut launcher, id, stop).await,
        }
    }
    // The launcher thread exits with `launcher`; only now, when no child is
    // left for its parent-death signal to reach.
    drop(launcher);
    debug!("supervisor stopped");
    done.send_replace(true);
}

fn next_step(inner: &Inner) -> Step {
    let mut state = inner.lock();
    if state.stopping {
        return if state.members.is_empty() {
            Step::Exit
        } else {
            Step::Wait(None)
        };
    }
    state.terminate_excess();
    if state.active() >= state.desired() {
        return Step::Wait(None);
    }
    if let Some(at) = state.retry_at
        && at > Instant::now()
    {
        return Step::Wait(Some(at));
    }
    let seq = NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed);
    let id = InstanceId(format!("i-local-{seq:04}"));
    let (stop, stop_rx) = watch::channel(false);
    state.members.insert(
        id.clone(),
        Member {
            seq,
            lifecycle: InstanceLifecycle::Pending,
            launched_at: SystemTime::now(),
            pid: None,
            stop,
        },
    );
    Step::Launch(id, stop_rx)
}

async fn launch(
    inner: &Arc<Inner>,
    launcher: &mut Option<Launcher>,
    id: InstanceId,
    stop: watch::Receiver<bool>,
) {
    let spawned = match inner.command(&id) {
        Ok(cmd) => spawn_with(launcher, cmd).await,
        Err(e) => Err(e),
    };
    let mut state = inner.lock();
    match spawned {
        Ok(child) => {
            let pid = child.id();
            let Some(member) = state.members.get_mut(&id) else {
                // Unreachable: only the instance task removes a member. Were
                // it to happen, dropping `child` kills it.
                return;
            };
            member.pid = pid;
            if member.lifecycle == InstanceLifecycle::Pending {
                member.lifecycle = InstanceLifecycle::InService;
            }
            info!(instance = %id, pid, "instance launched");
            let span = info_span!("instance", instance = %id);
            tokio::spawn(run_instance(Arc::clone(inner), id, child, stop).instrument(span));
        }
        Err(e) => {
            state.members.remove(&id);
            state.retired.insert(id.clone());
            state.record_failure();
            let retry_in = backoff(state.failures);
            warn!(
                instance = %id,
                program = %inner.spec.program.display(),
                error = %e,
                ?retry_in,
                "failed to launch instance"
            );
        }
    }
}

async fn spawn_with(launcher: &mut Option<Launcher>, cmd: Command) -> io::Result<Child> {
    if launcher.is_none() {
        *launcher = Some(Launcher::start()?);
    }
    let Some(l) = launcher.as_ref() else {
        return Err(io::Error::other("launcher thread not running"));
    };
    let result = l.spawn(cmd).await;
    if result.is_err() && !l.is_alive() {
        *launcher = None;
    }
    result
}

/// Owns one child: waits for it, stops it when asked, reaps it and removes
/// the instance from the group.
async fn run_instance(
    inner: Arc<Inner>,
    id: InstanceId,
    mut child: Child,
    mut stop: watch::Receiver<bool>,
) {
    let started = Instant::now();
    let mut asked_to_stop = false;
    let status = tokio::select! {
        status = child.wait() => status,
        () = stop_requested(&mut stop) => {
            asked_to_stop = true;
            stop_child(&mut child, inner.spec.stop_grace).await
        }
    };
    match &status {
        Ok(status) if asked_to_stop => info!(%status, "instance stopped"),
        Ok(status) => warn!(%status, "instance exited on its own"),
        Err(e) => warn!(error = %e, "failed to wait for instance"),
    }
    let mut state = inner.lock();
    state.members.remove(&id);
    state.retired.insert(id);
    if !asked_to_stop {
        if started.elapsed() < MIN_HEALTHY_RUN {
            state.record_failure();
        } else {
            state.failures = 0;
        }
    }
    drop(state);
    inner.wake.notify_one();
}

/// Resolves once a stop is requested (or can no longer be).
async fn stop_requested(stop: &mut watch::Receiver<bool>) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

/// SIGTERM to the child's process group, SIGKILL after `grace`; returns once
/// the child is reaped.
async fn stop_child(child: &mut Child, grace: Duration) -> io::Result<ExitStatus> {
    // `id()` is `Some` only until the child is reaped, which happens nowhere
    // but in this task: the pid is still ours when we signal it.
    if let Some(pid) = child.id()
        && let Err(e) = sys::signal_group(pid, libc::SIGTERM)
    {
        warn!(pid, error = %e, "failed to send SIGTERM");
    }
    if let Ok(status) = tokio::time::timeout(grace, child.wait()).await {
        return status;
    }
    warn!(?grace, "instance ignored SIGTERM; killing it");
    if let Some(pid) = child.id()
        && sys::signal_group(pid, libc::SIGKILL).is_err()
    {
        // The child left its process group; kill at least the child.
        let _ = child.start_kill();
    }
    child.wait().await
}

/// A thread that forks every child of one group. It lives until the group's
/// supervisor ends, because a child's parent-death signal fires when the
/// thread that forked it exits (tokio's blocking threads come and go).
struct Launcher {
    requests: mpsc::Sender<LaunchRequest>,
    thread: std::thread::JoinHandle<()>,
}

struct LaunchRequest {
    command: Command,
    reply: oneshot::Sender<io::Result<Child>>,
}

impl Launcher {
    fn start() -> io::Result<Self> {
        let runtime = tokio::runtime::Handle::current();
        let (requests, rx) = mpsc::channel::<LaunchRequest>();
        let thread = std::thread::Builder::new()
            .name("gru-local-launcher".to_owned())
            .spawn(move || {
                // tokio's Child registers with the runtime's process driver.
                let _runtime = runtime.enter();
                for mut request in rx {
                    let _ = request.reply.send(request.command.spawn());
                }
            })?;
        Ok(Launcher { requests, thread })
    }

    async fn spawn(&self, command: Command) -> io::Result<Child> {
        let (reply, rx) = oneshot::channel();
        self.requests
            .send(LaunchRequest { command, reply })
            .map_err(|_| io::Error::other("launcher thread is gone"))?;
        rx.await
            .map_err(|_| io::Error::other("launcher thread is gone"))?
    }

    fn is_alive(&self) -> bool {
        !self.thread.is_finished()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff(1), LAUNCH_BACKOFF_MIN);
        assert_eq!(backoff(2), LAUNCH_BACKOFF_MIN * 2);
        assert_eq!(backoff(3), LAUNCH_BACKOFF_MIN * 4);
        assert_eq!(backoff(1000), LAUNCH_BACKOFF_MAX);
        assert_eq!(backoff(u32::MAX), LAUNCH_BACKOFF_MAX);
    }
}
