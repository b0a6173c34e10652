//! [`LocalLoadBalancer`]: a TCP load balancer in the controller's process,
//! with the ELBv2 semantics the controller relies on.
//!
//! Each client connection is proxied to the healthy target with the fewest
//! active connections (ties in turn). A deregistered target drains: it gets
//! no new connection from that instant, its existing ones stay until either
//! side closes them or the deregistration delay ends and cuts them, and it
//! leaves the table (`Unused`) when it has no connection left.
//!
//! A connection is over as soon as either side closes it: MLLP has no use
//! for half a connection, and an engine that closed its side after a drain
//! must not stay counted (and its target `Draining`) until an idle sender
//! happens to close too. What a side sent before closing is still delivered
//! first, so the ACK an engine writes just before it closes arrives.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{CloudError, InstanceId, Target, TargetGroup, TargetState};

/// How long to wait for a target to accept before trying the next one.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Pause after a failed accept (e.g. out of file descriptors) so the loop
/// does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// After the client closed its side, how long the target has to finish what
/// it is sending (the client's end-of-stream reaches it at once) before the
/// connection is closed anyway.
const CLIENT_CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Buffer size of each direction of a proxied connection.
const RELAY_BUFFER: usize = 16 * 1024;

/// The most unread client input drained before closing a connection (see
/// `discard_unread`).
const DISCARD_LIMIT: usize = 256 * 1024;

/// One target as the load balancer sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetInfo {
    pub target: Target,
    pub state: TargetState,
    /// Connections open now (including one being connected).
    pub active_connections: u64,
    /// Connections proxied since the target was registered.
    pub total_connections: u64,
}

/// A TCP load balancer and the target group that steers it.
///
/// Dropping the last handle shuts it down.
pub struct LocalLoadBalancer {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
}

struct Shared {
    table: Mutex<Table>,
    deregistration_delay: Duration,
    /// Becomes true on shutdown: stops the accept loop and cuts every
    /// connection.
    shutdown: watch::Sender<bool>,
}

#[derive(Default)]
struct Table {
    entries: HashMap<Target, Entry>,
    /// Distinguishes a target's entries across deregistration and
    /// re-registration, so a connection of an earlier entry never counts
    /// against a later one.
    next_generation: u64,
    /// Round-robin position among equally loaded targets.
    next_pick: usize,
}

struct Entry {
    generation: u64,
    state: TargetState,
    /// Bumped on every deregistration and re-registration, so the delay
    /// timer of an earlier drain cannot cut a later one short.
    drain_epoch: u64,
    active: u64,
    total: u64,
    /// Set to true (or dropped) to cut every connection to this target.
    cut: watch::Sender<bool>,
}

impl LocalLoadBalancer {
    /// Starts proxying connections accepted on `listener`. Must be called
    /// within a tokio runtime.
    pub fn start(listener: TcpListener, deregistration_delay: Duration) -> Arc<Self> {
        // getsockname on a bound socket fails only for a bad descriptor,
        // which an open `TcpListener` rules out.
        let local_addr = listener
            .local_addr()
            .expect("a bound listener has a local address");
        let shared = Arc::new(Shared {
            table: Mutex::new(Table::default()),
            deregistration_delay,
            shutdown: watch::Sender::new(false),
        });
        let span = info_span!("local_lb", listen = %local_addr);
        tokio::spawn(accept_loop(Arc::clone(&shared), listener).instrument(span));
        Arc::new(LocalLoadBalancer { shared, local_addr })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Every target in the table, ordered by address.
    pub fn targets(&self) -> Vec<TargetInfo> {
        let table = self.shared.lock();
        let mut targets: Vec<TargetInfo> = table
            .entries
            .iter()
            .map(|(target, entry)| TargetInfo {
                target: target.clone(),
                state: entry.state,
                active_connections: entry.active,
                total_connections: entry.total,
            })
            .collect();
        targets.sort_by(|a, b| {
            (a.target.address, &a.target.instance).cmp(&(b.target.address, &b.target.instance))
        });
        targets
    }

    /// Stops accepting (the listening socket closes) and cuts every
    /// connection. Idempotent.
    pub fn shutdown(&self) {
        self.shared.shutdown.send_replace(true);
    }
}

impl Drop for LocalLoadBalancer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[async_trait]
impl TargetGroup for LocalLoadBalancer {
    async fn register(&self, target: &Target) -> Result<(), CloudError> {
        let mut table = self.shared.lock();
        if let Some(entry) = table.entries.get_mut(target) {
            if entry.state != TargetState::Healthy {
                info!(instance = %target.instance, address = %target.address, "target registered again");
                entry.state = TargetState::Healthy;
                entry.drain_epoch += 1;
            }
            return Ok(());
        }
        let generation = table.next_generation;
        table.next_generation += 1;
        table.entries.insert(
            target.clone(),
            Entry {
                generation,
                state: TargetState::Healthy,
                drain_epoch: 0,
                active: 0,
                total: 0,
                cut: watch::Sender::new(false),
            },
        );
        info!(instance = %target.instance, address = %target.address, "target registered");
        Ok(())
    }

    async fn deregister(&self, target: &Target) -> Result<(), CloudError> {
        let mut table = self.shared.lock();
        let Some(entry) = table.entries.get_mut(target) else {
            return Ok(());
        };
        if entry.state == TargetState::Draining {
            return Ok(());
        }
        if entry.active == 0 {
            table.entries.remove(target);
            info!(instance = %target.instance, address = %target.address, "target deregistered");
            return Ok(());
        }
        entry.state = TargetState::Draining;
        entry.drain_epoch += 1;
        let (generation, epoch, active) = (entry.generation, entry.drain_epoch, entry.active);
        drop(table);
        info!(
            instance = %target.instance,
            address = %target.address,
            active,
            "target draining"
        );
        let shared = Arc::downgrade(&self.shared);
        let target = target.clone();
        let delay = self.shared.deregistration_delay;
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            end_drain(&shared, &target, generation, epoch);
        });
        Ok(())
    }

    async fn target_state(&self, target: &Target) -> Result<TargetState, CloudError> {
        Ok(self
            .shared
            .lock()
            .entries
            .get(target)
            .map_or(TargetState::Unused, |e| e.state))
    }

    fn connections_total(&self, target: &Target) -> Option<u64> {
        self.shared.lock().entries.get(target).map(|e| e.total)
    }
}

/// The deregistration delay of one drain is over: cut what is left.
fn end_drain(shared: &Weak<Shared>, target: &Target, generation: u64, epoch: u64) {
    let Some(shared) = shared.upgrade() else {
        return;
    };
    let mut table = shared.lock();
    let Some(entry) = table.entries.get(target) else {
        return;
    };
    if entry.generation != generation
        || entry.drain_epoch != epoch
        || entry.state != TargetState::Draining
    {
        return;
    }
    info!(
        instance = %target.instance,
        address = %target.address,
        cut = entry.active,
        "deregistration delay over; cutting remaining connections"
    );
    entry.cut.send_replace(true);
    table.entries.remove(target);
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Table> {
        // No critical section can panic halfway through an update.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Chooses the healthy target with the fewest active connections among
    /// those not yet `tried`, and counts the connection against it.
    fn pick(self: &Arc<Self>, tried: &[Target]) -> Option<Lease> {
        let mut table = self.lock();
        let candidates = || {
            table
                .entries
                .iter()
                .filter(|(t, e)| e.state == TargetState::Healthy && !tried.contains(t))
        };
        let fewest = candidates().map(|(_, e)| e.active).min()?;
        let mut ties: Vec<Target> = candidates()
            .filter(|(_, e)| e.active == fewest)
            .map(|(t, _)| t.clone())
            .collect();
        ties.sort_by(|a, b| (a.address, &a.instance).cmp(&(b.address, &b.instance)));
        let target = ties.swap_remove(table.next_pick % ties.len());
        table.next_pick = table.next_pick.wrapping_add(1);
        let entry = table.entries.get_mut(&target)?;
        entry.active += 1;
        Some(Lease {
            shared: Arc::clone(self),
            generation: entry.generation,
            cut: entry.cut.subscribe(),
            target,
        })
    }
}

/// One connection counted against a target; dropping it uncounts it and
/// removes a draining target whose last connection this was.
struct Lease {
    shared: Arc<Shared>,
    target: Target,
    generation: u64,
    cut: watch::Receiver<bool>,
}

impl Lease {
    fn connected(&self) {
        let mut table = self.shared.lock();
        if let Some(entry) = table.entries.get_mut(&self.target)
            && entry.generation == self.generation
        {
            entry.total += 1;
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut table = self.shared.lock();
        let Some(entry) = table.entries.get_mut(&self.target) else {
            return;
        };
        if entry.generation != self.generation {
            return;
        }
        entry.active = entry.active.saturating_sub(1);
        if entry.state == TargetState::Draining && entry.active == 0 {
            table.entries.remove(&self.target);
            info!(
                instance = %self.target.instance,
                address = %self.target.address,
                "target drained"
            );
        }
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let mut shutdown = shared.shutdown.subscribe();
    info!("load balancer listening");
    loop {
        let accepted = tokio::select! {
            () = is_set(&mut shutdown) => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((client, peer)) => {
                let span = info_span!("connection", %peer);
                tokio::spawn(proxy(Arc::clone(&shared), client).instrument(span));
            }
            Err(e) => {
                warn!(error = %e, "failed to accept a connection");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
    info!("load balancer stopped");
}

async fn proxy(shared: Arc<Shared>, mut client: TcpStream) {
    let mut tried = Vec::new();
    let (lease, mut upstream) = loop {
        let Some(lease) = shared.pick(&tried) else {
            debug!("no healthy target left; closing the client connection");
            return;
        };
        let address = lease.target.address;
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address)).await {
            Ok(Ok(upstream)) => break (lease, upstream),
            Ok(Err(e)) => {
                warn!(instance = %lease.target.instance, %address, error = %e, "failed to connect to target");
            }
            Err(_) => {
                warn!(instance = %lease.target.instance, %address, "timed out connecting to target");
            }
        }
        tried.push(lease.target.clone());
    };
    lease.connected();
    // Latency matters more than packet count for HL7 messages and ACKs.
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let mut cut = lease.cut.clone();
    let mut shutdown = shared.shutdown.subscribe();
    tokio::select! {
        () = relay(&mut client, &mut upstream, &lease.target.instance) => discard_unread(&mut client),
        () = is_set(&mut cut) => debug!(instance = %lease.target.instance, "connection cut"),
        () = is_set(&mut shutdown) => {}
    }
    // Close both sockets before the connection stops counting.
    drop(client);
    drop(upstream);
    drop(lease);
}

/// Copies bytes both ways until the connection is over, which is as soon as
/// either side is done.
///
/// When the target closes, everything it sent is written to the client,
/// then the client gets end-of-stream and the relay ends, whether or not
/// the client is still there to notice. When the client closes, the target
/// gets end-of-stream at once and [`CLIENT_CLOSE_LINGER`] to finish sending;
/// when the client's side fails (a reset), the relay ends at once.
async fn relay(client: &mut TcpStream, upstream: &mut TcpStream, instance: &InstanceId) {
    let (mut client_read, mut client_write) = client.split();
    let (mut upstream_read, mut upstream_write) = upstream.split();
    let down = pump(&mut upstream_read, &mut client_write);
    let up = pump(&mut client_read, &mut upstream_write);
    tokio::pin!(down);
    tokio::select! {
        result = &mut down => match result {
            Ok(bytes) => debug!(%instance, down = bytes, "target closed the connection"),
            Err(e) => debug!(%instance, error = %e, "target side of the connection ended"),
        },
        result = up => match result {
            Ok(bytes) => {
                debug!(%instance, up = bytes, "client closed the connection");
                if tokio::time::timeout(CLIENT_CLOSE_LINGER, &mut down).await.is_err() {
                    debug!(%instance, linger = ?CLIENT_CLOSE_LINGER, "target kept its side open; closing it");
                }
            }
            // Nobody is left to receive what the target still sends.
            Err(e) => debug!(%instance, error = %e, "client side of the connection ended"),
        },
    }
}

/// Copies `from` to `to` until `from` ends, then shuts `to` down for
/// writing. Every byte read is written before the next read, so nothing
/// read is lost when `from` then ends or fails. Returns the bytes copied.
async fn pump<R, W>(from: &mut R, to: &mut W) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; RELAY_BUFFER];
    let mut copied = 0u64;
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            to.shutdown().await?;
            return Ok(copied);
        }
        to.write_all(&buf[..n]).await?;
        copied += n as u64;
    }
}

/// Reads and drops what the client sent that nobody will read. Closing a
/// socket with unread input makes the kernel reset the connection instead
/// of closing it, which would throw away what is still queued for the
/// client (the target's last ACK) before it arrives.
/// Reads at most [`DISCARD_LIMIT`] bytes, so a client that keeps sending
/// cannot hold the task here.
fn discard_unread(client: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    let mut discarded = 0;
    while discarded < DISCARD_LIMIT {
        match client.try_read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => discarded += n,
        }
    }
}

/// Resolves once the flag is true or its sender is gone.
async fn is_set(flag: &mut watch::Receiver<bool>) {
    while !*flag.borrow_and_update() {
        if flag.changed().await.is_err() {
            return;
        }
    }
}
