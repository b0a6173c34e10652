//! [`LocalGroup`]: a capacity group whose instances are processes on this
//! machine.
//!
//! One supervisor task per group keeps the number of instances that are not
//! terminating equal to the desired capacity, the way an Auto Scaling group
//! does. Each instance is owned by its own instance task, the only place that
//! signals it, and never a recycled pid: a child is reaped by its task
//! ([`run_instance`]), and an instance adopted from an earlier controller is
//! checked by pid *and* start time before every signal ([`run_adopted`]).
//! Children are forked by a dedicated launcher thread; see
//! [`sys::die_with_parent`] for why the forking thread matters. With a state
//! file, a persister task keeps the file in step with the members
//! ([`persist_loop`]).

use std::collections::{HashMap, HashSet};
use std::error::Error;
use std::ffi::OsString;
use std::fmt;
use std::fs::OpenOptions;
use std::io;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak, mpsc};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use tokio::process::{Child, Command};
use tokio::sync::{Notify, oneshot, watch};
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::state::{Record, StateFile, StateFileError, epoch_ms};
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

/// How often an adopted instance, which is not our child and so sends us no
/// SIGCHLD, is checked for having exited.
const ADOPTED_POLL: Duration = Duration::from_millis(250);

/// Instance numbers are process-wide rather than per group so that two local
/// fleets in one `gru dev` never hand the controller the same instance id. A
/// group with a state file first raises it past every number the file has
/// seen, so a restarted controller never reuses one either.
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
    /// Where the group records its instances so they can outlive this
    /// process and be adopted by the next one (see [`LocalGroup`], "Instances
    /// that outlive the controller"). `None`: every instance dies with this
    /// process. The groups of one controller should all name the same file
    /// (each under its own group name): they then share one sequence of
    /// instance numbers, so no two instances ever get the same id, restarts
    /// included.
    pub state_file: Option<PathBuf>,
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
            state_file: None,
        }
    }
}

/// A capacity group whose instances are processes on this machine.
///
/// Dropping the last handle stops every instance (SIGTERM to its process
/// group, then SIGKILL after the grace period) without waiting;
/// [`LocalGroup::shutdown`] waits.
///
/// # Instances that outlive the controller
///
/// Without a [`LaunchSpec::state_file`], instances are children that die
/// with this process, even when it is killed with SIGKILL. With one, they
/// behave like EC2 instances, which outlive their controller:
///
/// - Each is started in a session of its own and without a parent-death
///   signal, so a killed controller leaves it running, and a Ctrl-C in the
///   controller's terminal reaches it only through the controller.
/// - The file lists every member (id, pid, the process's start time, launch
///   time, whether its termination had begun) and the next instance number.
///   It is rewritten whenever membership changes; an instance number is
///   recorded as used before its process is spawned, and its pid right
///   after, before the instance shows `InService`. (A controller killed in
///   the milliseconds between that spawn and that write leaves an instance
///   nobody adopts: the one gap.)
/// - [`LocalGroup::start`] adopts each recorded instance whose pid still runs
///   with the recorded start time (a recycled pid is never mistaken for
///   one). An adopted instance is `InService` (or finishes its termination
///   if that had begun) and is supervised by polling `/proc`; it is stopped
///   like a child, SIGTERM to its process group then SIGKILL, and only while
///   its pid and start time still match. Recorded instances that no longer
///   run are not members, and terminating them is a no-op.
/// - The desired capacity becomes `max(desired, adopted instances not
///   terminating)`, clamped into `min..=max`: a restart launches nothing just
///   because the group restarted, and stops no adopted instance unless there
///   are more than `max` (then the newest go, as when desired is lowered).
///   The controller sets its own desired capacity on its first pass anyway.
/// - [`LocalGroup::shutdown`] and dropping the group still stop every
///   instance, adopted ones included, and leave the file listing none:
///   only a controller that dies without stopping leaves instances behind.
///
/// Give such a group a [`LaunchSpec::log_dir`] too: an instance that
/// inherits the controller's output would otherwise write to whatever that
/// was once the controller is gone.
pub struct LocalGroup {
    inner: Arc<Inner>,
    /// Becomes true when the supervisor has exited, which it does only once
    /// every instance is gone and the state file says so.
    done: watch::Receiver<bool>,
}

struct Inner {
    name: String,
    spec: LaunchSpec,
    state: Mutex<State>,
    /// Wakes the supervisor: the desired capacity changed, an instance ended
    /// or shutdown began.
    wake: Notify,
    /// `Some` when the spec has a state file.
    persist: Option<Persist>,
}

/// Keeps the state file in step with the members, through one writer task
/// ([`persist_loop`]) so writes never land out of order.
struct Persist {
    file: StateFile,
    /// Bumped by every change the file must show.
    requested: watch::Sender<u64>,
    /// The last request the file has caught up with (written, or failed and
    /// logged).
    written: watch::Sender<u64>,
}

struct State {
    desired: u32,
    min: u32,
    max: u32,
    members: HashMap<InstanceId, Member>,
    /// Instances that were members once, or were recorded in the state file
    /// but no longer ran: terminating them is a no-op, not `NotFound`.
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
    /// The process's start time ([`sys::ProcStat::start_time`]): with the
    /// pid, what names the process in the state file. `None` until known.
    start_time: Option<u64>,
    /// Set to true to make the instance task stop the instance.
    stop: watch::Sender<bool>,
}

/// A process that an earlier controller launched and this group adopted.
/// Not our child: no SIGCHLD tells us it exited, and its pid could be
/// recycled once it has, so it is watched through `/proc` and named by pid
/// and start time together.
#[derive(Clone, Copy, Debug)]
struct Adopted {
    pid: u32,
    start_time: u64,
}

impl Adopted {
    /// True while the process runs (not a zombie) with the recorded start time.
    fn running(self) -> bool {
        sys::proc_stat(self.pid).is_some_and(|s| !s.exited && s.start_time == self.start_time)
    }

    /// Resolves once the process has exited.
    async fn exited(self) {
        while self.running() {
            tokio::time::sleep(ADOPTED_POLL).await;
        }
    }

    /// Signals the process group the instance leads, unless the instance is
    /// gone. Checked right before kill(2): the pid could only name someone
    /// else's group if, in between, the instance exited, its group emptied
    /// and a new process got the same number and made itself a group leader.
    fn signal(self, signal: libc::c_int) -> io::Result<()> {
        if !self.running() {
            return Ok(());
        }
        sys::signal_group(self.pid, signal)
    }
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

    /// Marks `id` terminating and tells its task to stop the instance.
    fn begin_terminate(&mut self, id: &InstanceId) {
        if let Some(member) = self.members.get_mut(id) {
            member.lifecycle = InstanceLifecycle::Terminating;
            member.stop.send_replace(true);
        }
    }

    /// Terminates the newest instances while more are active than desired,
    /// as an Auto Scaling group does when its desired capacity is lowered.
    /// Returns whether it terminated any.
    fn terminate_excess(&mut self) -> bool {
        let mut terminated = false;
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
            terminated = true;
        }
        terminated
    }

    /// What the state file should list: every member with a known process.
    fn records(&self) -> Vec<Record> {
        records(&self.members)
    }

    fn record_failure(&mut self) {
        self.failures = self.failures.saturating_add(1);
        self.retry_at = Some(Instant::now() + backoff(self.failures));
    }
}

/// The state file's records of `members`, in launch order.
fn records(members: &HashMap<InstanceId, Member>) -> Vec<Record> {
    let mut records: Vec<Record> = members
        .iter()
        .filter_map(|(id, m)| {
            Some(Record {
                id: id.0.clone(),
                number: m.seq,
                pid: m.pid?,
                start_time: m.start_time?,
                launched_at_ms: epoch_ms(m.launched_at),
                terminating: m.lifecycle == InstanceLifecycle::Terminating,
            })
        })
        .collect();
    records.sort_by_key(|r| r.number);
    records
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
        self.mark_changed();
        self.wake.notify_one();
    }

    /// Asks the persister to write the members out; does not wait.
    fn mark_changed(&self) {
        if let Some(persist) = &self.persist {
            persist.requested.send_modify(|g| *g += 1);
        }
    }

    /// Asks the persister to write the members out and waits until it has.
    async fn flush(&self) {
        let Some(persist) = &self.persist else {
            return;
        };
        let mut target = 0;
        persist.requested.send_modify(|g| {
            *g += 1;
            target = *g;
        });
        let mut written = persist.written.subscribe();
        // `written` lives in `self`, so its sender cannot be gone.
        let _ = written.wait_for(|w| *w >= target).await;
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
            .stdin(Stdio::null());
        if let Some(dir) = &spec.log_dir {
            let log = OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(format!("{id}.log")))?;
            cmd.stdout(log.try_clone()?).stderr(log);
        }
        // Either way the instance leads its own process group, so stopping
        // it reaches the processes it started too.
        if self.persist.is_some() {
            // Meant to outlive us: no parent-death signal, no kill when a
            // dropped runtime drops the `Child`, and a session of its own.
            sys::new_session(&mut cmd);
        } else {
            cmd.process_group(0).kill_on_drop(true);
            sys::die_with_parent(&mut cmd);
        }
        Ok(cmd)
    }
}

/// What a group starts with besides its spec: the instances it adopted from
/// the state file.
#[derive(Default)]
struct Adoption {
    members: HashMap<InstanceId, Member>,
    /// Recorded instances that no longer run.
    retired: HashSet<InstanceId>,
    tasks: Vec<(InstanceId, Adopted, watch::Receiver<bool>)>,
}

impl Adoption {
    /// Reads `group`'s records, adopts those whose process still runs and
    /// rewrites the file to list exactly those.
    fn load(file: &StateFile, group: &str) -> Result<Self, StateFileError> {
        let loaded = file.load(group)?;
        let highest = loaded.records.iter().map(|r| r.number).max().unwrap_or(0);
        NEXT_INSTANCE.fetch_max(
            loaded.next_instance.max(highest.saturating_add(1)),
            Ordering::Relaxed,
        );
        let mut adoption = Adoption::default();
        for record in loaded.records {
            let id = InstanceId(record.id.clone());
            let process = Adopted {
                pid: record.pid,
                start_time: record.start_time,
            };
            if !process.running() {
                info!(group, instance = %id, pid = record.pid, "recorded instance no longer runs");
                adoption.retired.insert(id);
                continue;
            }
            info!(
                group,
                instance = %id,
                pid = record.pid,
                terminating = record.terminating,
                "adopting running instance"
            );
            let (stop, stop_rx) = watch::channel(record.terminating);
            adoption.members.insert(
                id.clone(),
                Member {
                    seq: record.number,
                    lifecycle: if record.terminating {
                        InstanceLifecycle::Terminating
                    } else {
                        InstanceLifecycle::InService
                    },
                    launched_at: record.launched_at(),
                    pid: Some(record.pid),
                    start_time: Some(record.start_time),
                    stop,
                },
            );
            adoption.tasks.push((id, process, stop_rx));
        }
        file.save(
            group,
            NEXT_INSTANCE.load(Ordering::Relaxed),
            &records(&adoption.members),
        )?;
        Ok(adoption)
    }

    /// Adopted instances that count toward the desired capacity.
    fn active(&self) -> usize {
        self.members
            .values()
            .filter(|m| m.lifecycle != InstanceLifecycle::Terminating)
            .count()
    }
}

impl LocalGroup {
    /// Starts a group and its supervisor task, which launches `desired`
    /// instances right away (`desired` is clamped into `min..=max`). With a
    /// state file, the group first adopts the instances recorded there that
    /// still run, and `desired` is raised to their number (see "Instances
    /// that outlive the controller"). Must be called within a tokio runtime.
    ///
    /// A state file that cannot be read, is not valid, or cannot be written
    /// is left as it is and logged as an error, and the group runs without
    /// one: its instances then die with this process. Use
    /// [`LocalGroup::try_start`] to refuse instead.
    pub fn start(name: &str, spec: LaunchSpec, min: u32, max: u32, desired: u32) -> Arc<Self> {
        let adoption = match &spec.state_file {
            None => Ok(None),
            Some(path) => {
                let file = StateFile::new(path.clone());
                Adoption::load(&file, name).map(|a| Some((file, a)))
            }
        };
        match adoption {
            Ok(adoption) => Self::run(name, spec, min, max, desired, adoption),
            Err(e) => {
                error!(
                    group = %name,
                    error = %ErrorChain(&e),
                    "running without the state file: instances will not outlive this process"
                );
                let spec = LaunchSpec {
                    state_file: None,
                    ..spec
                };
                Self::run(name, spec, min, max, desired, None)
            }
        }
    }

    /// [`LocalGroup::start`], but a state file that cannot be used is an
    /// error (and nothing is started) instead of a group without one.
    pub fn try_start(
        name: &str,
        spec: LaunchSpec,
        min: u32,
        max: u32,
        desired: u32,
    ) -> Result<Arc<Self>, StateFileError> {
        let adoption = match &spec.state_file {
            None => None,
            Some(path) => {
                let file = StateFile::new(path.clone());
                let adoption = Adoption::load(&file, name)?;
                Some((file, adoption))
            }
        };
        Ok(Self::run(name, spec, min, max, desired, adoption))
    }

    fn run(
        name: &str,
        spec: LaunchSpec,
        min: u32,
        max: u32,
        desired: u32,
        adoption: Option<(StateFile, Adoption)>,
    ) -> Arc<Self> {
        let (persist, adoption) = match adoption {
            Some((file, adoption)) => (
                Some(Persist {
                    file,
                    requested: watch::Sender::new(0),
                    written: watch::Sender::new(0),
                }),
                adoption,
            ),
            None => (None, Adoption::default()),
        };
        let adopted = u32::try_from(adoption.active()).unwrap_or(u32::MAX);
        let desired = desired.max(adopted).clamp(min, max.max(min));
        let inner = Arc::new(Inner {
            name: name.to_owned(),
            spec,
            state: Mutex::new(State {
                desired,
                min,
                max,
                members: adoption.members,
                retired: adoption.retired,
                stopping: false,
                failures: 0,
                retry_at: None,
            }),
            wake: Notify::new(),
            persist,
        });
        let (done_tx, done) = watch::channel(false);
        let span = info_span!("local_group", group = %name);
        if let Some(persist) = &inner.persist {
            let requested = persist.requested.subscribe();
            tokio::spawn(persist_loop(Arc::downgrade(&inner), requested).instrument(span.clone()));
        }
        for (id, process, stop) in adoption.tasks {
            let instance_span = info_span!(parent: &span, "instance", instance = %id);
            tokio::spawn(
                run_adopted(Arc::clone(&inner), id, process, stop).instrument(instance_span),
            );
        }
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

    /// Pids of the instances currently running (children and adopted
    /// processes), terminating ones included.
    pub fn running_pids(&self) -> Vec<u32> {
        self.inner
            .lock()
            .members
            .values()
            .filter_map(|m| m.pid)
            .collect()
    }

    /// The synchronous part of [`CapacityGroup::terminate`]; returns whether
    /// a termination began.
    fn begin_terminate(&self, id: &InstanceId, decrement: bool) -> Result<bool, CloudError> {
        let mut state = self.inner.lock();
        let Some(member) = state.members.get(id) else {
            if state.retired.contains(id) {
                return Ok(false);
            }
            return Err(CloudError::NotFound {
                what: format!("instance {id} in group {}", self.inner.name),
            });
        };
        if member.lifecycle == InstanceLifecycle::Terminating {
            return Ok(false);
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
        Ok(true)
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
        let terminated = state.terminate_excess();
        drop(state);
        if terminated {
            self.inner.mark_changed();
        }
        self.inner.wake.notify_one();
        Ok(())
    }

    async fn terminate(&self, id: &InstanceId, decrement: bool) -> Result<(), CloudError> {
        if self.begin_terminate(id, decrement)? {
            // A restarted group finishes the termination instead of
            // adopting the instance as in service.
            self.inner.flush().await;
        }
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
    // The state file lists no instance once `shutdown` returns.
    inner.flush().await;
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
    if state.terminate_excess() {
        inner.mark_changed();
    }
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
            start_time: None,
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
    // The number is taken from here on: with a state file, record that
    // before any process carries it, so a restart never hands it out again.
    inner.flush().await;
    let spawned = match inner.command(&id) {
        Ok(cmd) => spawn_with(launcher, cmd).await,
        Err(e) => Err(e),
    };
    let child = match spawned {
        Ok(child) => child,
        Err(e) => {
            let mut state = inner.lock();
            state.members.remove(&id);
            state.retired.insert(id.clone());
            state.record_failure();
            let retry_in = backoff(state.failures);
            drop(state);
            warn!(
                instance = %id,
                program = %inner.spec.program.display(),
                error = %e,
                ?retry_in,
                "failed to launch instance"
            );
            return;
        }
    };
    let pid = child.id();
    // The child is not reaped before its task runs, so its /proc entry is
    // still there.
    let start_time = pid.and_then(sys::proc_stat).map(|s| s.start_time);
    {
        let mut state = inner.lock();
        let Some(member) = state.members.get_mut(&id) else {
            // Unreachable: only the instance task removes a member. Were it
            // to happen, dropping `child` kills it (without a state file;
            // with one, it is left to run like any orphan).
            return;
        };
        member.pid = pid;
        member.start_time = start_time;
    }
    info!(instance = %id, pid, "instance launched");
    let span = info_span!("instance", instance = %id);
    tokio::spawn(run_instance(Arc::clone(inner), id.clone(), child, stop).instrument(span));
    // In service only once recorded: whatever the controller sees in
    // service, a restarted one adopts.
    inner.flush().await;
    if let Some(member) = inner.lock().members.get_mut(&id)
        && member.lifecycle == InstanceLifecycle::Pending
    {
        member.lifecycle = InstanceLifecycle::InService;
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
    inner.mark_changed();
    inner.wake.notify_one();
}

/// Owns one adopted instance: watches it, stops it when asked, and removes
/// it from the group once its process is gone.
async fn run_adopted(
    inner: Arc<Inner>,
    id: InstanceId,
    process: Adopted,
    mut stop: watch::Receiver<bool>,
) {
    let asked_to_stop = tokio::select! {
        () = process.exited() => false,
        () = stop_requested(&mut stop) => {
            stop_adopted(process, inner.spec.stop_grace).await;
            true
        }
    };
    if asked_to_stop {
        info!(pid = process.pid, "instance stopped");
    } else {
        warn!(pid = process.pid, "instance exited on its own");
    }
    let mut state = inner.lock();
    state.members.remove(&id);
    state.retired.insert(id);
    drop(state);
    inner.mark_changed();
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

/// SIGTERM to an adopted instance's process group, SIGKILL after `grace`;
/// returns once the process is gone.
async fn stop_adopted(process: Adopted, grace: Duration) {
    if let Err(e) = process.signal(libc::SIGTERM) {
        warn!(pid = process.pid, error = %e, "failed to send SIGTERM");
    }
    if tokio::time::timeout(grace, process.exited()).await.is_ok() {
        return;
    }
    warn!(?grace, "instance ignored SIGTERM; killing it");
    if let Err(e) = process.signal(libc::SIGKILL) {
        warn!(pid = process.pid, error = %e, "failed to send SIGKILL");
    }
    process.exited().await;
}

/// The only writer of a group's state file once the group runs: whenever a
/// change is requested, writes the members as they are now. Requests that
/// arrive during a write are folded into the next one. Ends with the group.
async fn persist_loop(inner: Weak<Inner>, mut requested: watch::Receiver<u64>) {
    // The group was started with the file already showing its members.
    while requested.changed().await.is_ok() {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let Some(persist) = &inner.persist else {
            return;
        };
        let generation = *requested.borrow_and_update();
        let records = inner.lock().records();
        let next_instance = NEXT_INSTANCE.load(Ordering::Relaxed);
        let file = persist.file.clone();
        let group = inner.name.clone();
        let written =
            tokio::task::spawn_blocking(move || file.save(&group, next_instance, &records)).await;
        match written {
            Ok(Ok(())) => debug!(file = %persist.file.path().display(), "state file written"),
            Ok(Err(e)) => warn!(error = %ErrorChain(&e), "failed to record the group's instances"),
            Err(e) => warn!(error = %e, "state file writer failed"),
        }
        persist.written.send_replace(generation);
        // `inner` is dropped here: no reference is held while idle, so the
        // group can end.
    }
}

/// Displays an error with its sources, `outer: inner: …`, for log fields.
struct ErrorChain<'a>(&'a dyn Error);

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
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
