//! What the http and exec adapters share: a background task that polls the
//! external engine and caches its status ([`Engine::status`] is sync and
//! called on every report), and the drain lifecycle ([`Phase`]) it drives.
//!
//! An adapter only says how to read and act ([`Probe`]); this module
//! decides when. All outbound calls happen on the one task, one at a time,
//! so a drain, a resume and a request to shed connections can never race
//! each other's calls.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{Engine, EngineStatus, Health};
use gru_core::error_chain;

/// The calls an adapter makes at each step of a drain or resume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stage {
    /// Stop intake.
    Drain,
    /// Once drained (e.g. stop the channels).
    AfterDrained,
    /// Take work again.
    Resume,
}

/// How to read and drive one kind of external engine. Each call is already
/// bounded by the adapter's timeout.
#[async_trait]
pub(crate) trait Probe: Send + Sync + 'static {
    type Error: std::error::Error + Send + Sync + 'static;

    /// `Ok` when healthy, or when no health check is configured.
    async fn health(&self) -> Result<(), Self::Error>;
    /// The number of messages the engine holds and has not delivered.
    async fn queue_depth(&self) -> Result<u64, Self::Error>;
    /// Whether the engine has nothing left, given the depth just read.
    async fn drained(&self, queue_depth: u64) -> Result<bool, Self::Error> {
        Ok(queue_depth == 0)
    }
    /// How many calls `stage` has.
    fn actions(&self, stage: Stage) -> usize;
    /// Makes call `index` of `stage`.
    async fn act(&self, stage: Stage, index: usize) -> Result<(), Self::Error>;
    /// The open inbound connections; `None` when the adapter is not told
    /// how to read them.
    async fn connections(&self) -> Option<Result<u64, Self::Error>> {
        None
    }
    /// Whether [`Probe::shed`] asks the engine for anything.
    fn can_shed(&self) -> bool {
        false
    }
    /// Asks the engine to close `count` inbound connections at message
    /// boundaries.
    async fn shed(&self, count: u64) -> Result<(), Self::Error> {
        let _ = count;
        Ok(())
    }
}

/// What the agent asked for last.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    Serve,
    Drain,
}

/// Where the external engine stands in a drain. Owned by the poller task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Taking work.
    Serving,
    /// Making the drain calls; `next` is the first not yet successful
    /// (a failed call is retried on the next poll, the earlier ones are not
    /// repeated).
    Draining { next: usize },
    /// Intake stopped; waiting until the engine reads drained.
    Flushing,
    /// Drained; making the after-drained calls.
    Finishing { next: usize },
    /// Nothing left and every call made: safe to terminate.
    Drained,
    /// Making the resume calls.
    Resuming { next: usize },
}

impl Phase {
    /// The phase after the agent asked for `want`.
    fn wanting(self, want: Want) -> Phase {
        match (self, want) {
            (Phase::Serving | Phase::Resuming { .. }, Want::Drain) => Phase::Draining { next: 0 },
            (
                Phase::Draining { .. } | Phase::Flushing | Phase::Finishing { .. } | Phase::Drained,
                Want::Serve,
            ) => Phase::Resuming { next: 0 },
            (phase, _) => phase,
        }
    }
}

/// What the poller task publishes.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Polled {
    queue_depth: u64,
    /// Open inbound connections, 0 when they cannot be read.
    connections: u64,
    health: Health,
    /// The task reached [`Phase::Drained`].
    drained: bool,
    /// The last failure, as logged; cleared by a good poll.
    last_error: Option<String>,
}

/// An external engine behind a [`Probe`], polled in the background.
pub(crate) struct Adapter<P: Probe> {
    probe: Arc<P>,
    address: SocketAddr,
    want: watch::Sender<Want>,
    /// The last request to shed connections; each send is one request.
    shed: watch::Sender<u64>,
    polled: watch::Receiver<Polled>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl<P: Probe> Adapter<P> {
    /// Starts polling at once, then every `poll_interval`.
    pub(crate) fn start(probe: P, address: SocketAddr, poll_interval: Duration) -> Self {
        let probe = Arc::new(probe);
        let (want, want_rx) = watch::channel(Want::Serve);
        let (shed, shed_rx) = watch::channel(0);
        let (polled_tx, polled) = watch::channel(Polled {
            queue_depth: 0,
            connections: 0,
            health: Health::Starting,
            drained: false,
            last_error: None,
        });
        let task = tokio::spawn(run(
            probe.clone(),
            want_rx,
            shed_rx,
            polled_tx,
            poll_interval,
        ));
        Adapter {
            probe,
            address,
            want,
            shed,
            polled,
            task: Mutex::new(Some(task)),
        }
    }

    /// The last failure of a poll or call, as it was logged; `None` after a
    /// good poll.
    pub(crate) fn last_error(&self) -> Option<String> {
        self.polled.borrow().last_error.clone()
    }

    pub(crate) fn probe(&self) -> &P {
        &self.probe
    }

    fn stop(&self) {
        if let Some(task) = lock(&self.task).take() {
            task.abort();
        }
    }
}

impl<P: Probe> Drop for Adapter<P> {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Only an Option is behind it: a panic cannot leave it inconsistent.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[async_trait]
impl<P: Probe> Engine for Adapter<P> {
    fn address(&self) -> SocketAddr {
        self.address
    }

    fn status(&self) -> EngineStatus {
        let p = self.polled.borrow();
        let draining = *self.want.borrow() == Want::Drain;
        EngineStatus {
            queue_depth: p.queue_depth,
            // Not visible from outside the engine: the queue depth stands for
            // all of it.
            in_flight: 0,
            processed_total: 0,
            failed_total: 0,
            open_connections: p.connections,
            health: p.health,
            draining,
            // A resume clears it at once, before the task notices.
            drained: draining && p.drained,
        }
    }

    fn drain(&self) {
        self.want.send_replace(Want::Drain);
    }

    fn resume(&self) {
        self.want.send_replace(Want::Serve);
    }

    fn can_shed(&self) -> bool {
        self.probe.can_shed()
    }

    /// Made on the poller task's next turn (at once: it wakes for it),
    /// unless the minion is draining by then; a newer request replaces one
    /// not yet made. The engine's own answer is not known here: the count
    /// asked for is returned.
    fn shed(&self, count: u64) -> u64 {
        if !self.probe.can_shed() || count == 0 || *self.want.borrow() == Want::Drain {
            return 0;
        }
        self.shed.send_replace(count);
        count
    }

    async fn shutdown(&self, grace: Duration) {
        self.drain();
        let mut polled = self.polled.clone();
        if tokio::time::timeout(grace, polled.wait_for(|p| p.drained))
            .await
            .is_err()
        {
            tracing::warn!(grace = ?grace, "the engine did not drain in time; stopping anyway");
        }
        self.stop();
    }
}

/// Logs a failure at warn only when it differs from the last one, and its
/// recovery once, so a poll every second does not flood the log.
#[derive(Default)]
struct OnChange {
    last: Option<String>,
}

impl OnChange {
    fn failed(&mut self, what: &'static str, message: &str) {
        if self.last.as_deref() != Some(message) {
            tracing::warn!(error = %message, "{what}");
            self.last = Some(message.to_owned());
        }
    }

    fn ok(&mut self, what: &'static str) {
        if self.last.take().is_some() {
            tracing::info!("{what}");
        }
    }
}

async fn run<P: Probe>(
    probe: Arc<P>,
    mut want: watch::Receiver<Want>,
    mut shed: watch::Receiver<u64>,
    polled: watch::Sender<Polled>,
    poll_interval: Duration,
) {
    let mut phase = Phase::Serving;
    let mut answered = false;
    let mut poll_log = OnChange::default();
    let mut call_log = OnChange::default();
    let mut connections_log = OnChange::default();
    // Woken for a request to shed (waking marks it seen).
    let mut shed_asked = false;
    let mut tick = tokio::time::interval(poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let before = phase;
        phase = phase.wanting(*want.borrow_and_update());
        if phase != before {
            tracing::info!(from = ?before, to = ?phase, "engine adapter");
        }
        if !matches!(phase, Phase::Drained) {
            polled.send_if_modified(|p| std::mem::replace(&mut p.drained, false));
        }
        let mut call_error = None;

        // Calls first, so a drained engine is read after they succeeded.
        phase = match phase {
            Phase::Draining { next } => match act(&*probe, Stage::Drain, next).await {
                Ok(()) => Phase::Flushing,
                Err((next, e)) => {
                    call_error = Some(e);
                    Phase::Draining { next }
                }
            },
            Phase::Resuming { next } => match act(&*probe, Stage::Resume, next).await {
                Ok(()) => Phase::Serving,
                Err((next, e)) => {
                    call_error = Some(e);
                    Phase::Resuming { next }
                }
            },
            phase => phase,
        };
        // A request to shed counts only while serving: a drain closes every
        // connection anyway.
        // Not retried: the controller asks again while the imbalance lasts.
        let mut shed_error = None;
        if std::mem::take(&mut shed_asked) || shed.has_changed().unwrap_or(false) {
            let count = *shed.borrow_and_update();
            if phase == Phase::Serving {
                match probe.shed(count).await {
                    Ok(()) => tracing::info!(count, "asked the engine to shed connections"),
                    Err(e) => {
                        let e = error_chain(&e);
                        tracing::warn!(count, error = %e, "the request to shed connections failed");
                        shed_error = Some(e);
                    }
                }
            }
        }

        let health = probe.health().await;
        let depth = probe.queue_depth().await;
        let poll_error = match (&health, &depth) {
            (Ok(()), Ok(_)) => None,
            (Err(e), _) | (_, Err(e)) => Some(error_chain(e)),
        };
        answered |= poll_error.is_none();
        match &poll_error {
            None => poll_log.ok("the engine answers again"),
            Some(e) => poll_log.failed("cannot read the engine's status", e),
        }
        // Only rebalancing reads the connections: a failure is logged and
        // keeps the last count, and does not make the engine unhealthy.
        let mut connections_error = None;
        let connections = match probe.connections().await {
            None => None,
            Some(Ok(n)) => {
                connections_log.ok("the engine's connections read again");
                Some(n)
            }
            Some(Err(e)) => {
                let e = error_chain(&e);
                connections_log.failed("cannot read the engine's connections", &e);
                connections_error = Some(e);
                None
            }
        };

        if let (Phase::Flushing, Ok(depth)) = (phase, &depth) {
            match probe.drained(*depth).await {
                Ok(true) => phase = Phase::Finishing { next: 0 },
                Ok(false) => {}
                Err(e) => call_error = Some(error_chain(&e)),
            }
        }
        if let Phase::Finishing { next } = phase {
            phase = match act(&*probe, Stage::AfterDrained, next).await {
                Ok(()) => Phase::Drained,
                Err((next, e)) => {
                    call_error = Some(e);
                    Phase::Finishing { next }
                }
            };
        }
        match &call_error {
            None => call_log.ok("the engine's calls succeed again"),
            Some(e) => call_log.failed("an engine call failed; retrying on the next poll", e),
        }
        if phase == Phase::Drained && before != Phase::Drained {
            tracing::info!("engine drained");
        }

        polled.send_modify(|p| {
            if let Ok(d) = depth {
                p.queue_depth = d;
            }
            if let Some(n) = connections {
                p.connections = n;
            }
            p.health = match (&poll_error, answered) {
                (None, _) => Health::Healthy,
                // Until the engine first answers it may still be starting
                // (some take minutes); that is not a failure yet.
                (Some(_), false) => Health::Starting,
                (Some(_), true) => Health::Unhealthy,
            };
            p.drained = phase == Phase::Drained;
            p.last_error = poll_error
                .or(call_error)
                .or(shed_error)
                .or(connections_error);
        });

        tokio::select! {
            _ = tick.tick() => {}
            changed = want.changed() => if changed.is_err() {
                // The adapter is gone.
                return;
            },
            changed = shed.changed() => match changed {
                Ok(()) => shed_asked = true,
                Err(_) => return,
            },
        }
    }
}

/// Makes the calls of `stage` from `next` on; on failure, which call to
/// retry and the error.
async fn act<P: Probe>(probe: &P, stage: Stage, next: usize) -> Result<(), (usize, String)> {
    for i in next..probe.actions(stage) {
        probe
            .act(stage, i)
            .await
            .map_err(|e| (i, error_chain(&e)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drain_and_a_resume_restart_their_calls() {
        use Phase::*;
        assert_eq!(Serving.wanting(Want::Drain), Draining { next: 0 });
        assert_eq!(Serving.wanting(Want::Serve), Serving);
        assert_eq!(
            Draining { next: 1 }.wanting(Want::Drain),
            Draining { next: 1 }
        );
        assert_eq!(
            Drained.wanting(Want::Drain),
            Drained,
            "a drain is idempotent"
        );
        for phase in [
            Draining { next: 1 },
            Flushing,
            Finishing { next: 0 },
            Drained,
        ] {
            assert_eq!(phase.wanting(Want::Serve), Resuming { next: 0 });
        }
        assert_eq!(
            Resuming { next: 2 }.wanting(Want::Drain),
            Draining { next: 0 }
        );
        assert_eq!(
            Resuming { next: 2 }.wanting(Want::Serve),
            Resuming { next: 2 }
        );
    }
}
