//! [`Lease`]: which controller leads, as one item of the state table, with
//! the DynamoDB lock client's semantics.
//!
//! The item (`pk = "lease"`, `sk = "leader"`) holds:
//! - `version`: a number the holder raises with every heartbeat. A
//!   challenger does not compare clocks: it remembers when it first saw a
//!   version and takes the lease only once that version stayed the same for
//!   the holder's whole `lease_ms` ([`Watch`]).
//! - `term`: raised only when the lease changes hands. It is the fence:
//!   every state write is conditioned on it ([`super::Fence`]), so a deposed
//!   leader's writes fail, and a renewal (which changes `version`, not
//!   `term`) never races a write.
//! - `holder`, `address` (where it serves), `lease_ms`, `since_ms` (when it
//!   took the lease, its clock, for display) and `released` (a leader that
//!   stops cleanly hands the lease back, so a standby takes it at once).
//!
//! Every change is one conditional write on what the writer last read, so
//! of two challengers exactly one wins, and a holder whose lease was taken
//! learns it at its next renewal.
//!
//! A leader that cannot renew stops acting before its lease could have been
//! taken: [`Lease::may_act`] is true only until one lease duration, less
//! one heartbeat of margin, after the *send* time of its last successful
//! renewal; a challenger's count starts no earlier than that renewal
//! landed. The margin covers the two hosts' clocks running at slightly
//! different rates (never their absolute time).

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_dynamodb::types::AttributeValue;
use gru_controller::config::LeaderConfig;
use gru_controller::ha::{Leadership, LeaseStatus};
use tokio::time::Instant;

use super::{Fence, LEASE_PK, LEASE_SK, PK, SK, TERM};

/// Bound on one lease call: a call that hangs longer counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The lease item as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRecord {
    pub version: u64,
    pub term: u64,
    pub holder: String,
    pub address: String,
    pub lease_ms: u64,
    pub since_ms: i64,
    pub released: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The table did not answer, or answered with an error other than a
    /// failed condition.
    #[error("lease in table {table}: {op} failed: {detail}")]
    Remote {
        table: String,
        op: &'static str,
        detail: String,
    },
    /// Another controller holds the lease now (a renewal's condition
    /// failed).
    #[error("the lease in table {table} was taken by {by}")]
    Lost { table: String, by: String },
    /// The lease could not be renewed for longer than it is safe to act.
    #[error(
        "the lease in table {table} could not be renewed within {within:?}; stepped down before it could be taken"
    )]
    Expired { table: String, within: Duration },
}

/// What a challenger makes of the lease item it just read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No holder (no item, or released): take it now.
    Free,
    /// A holder renewed within its lease: wait at most this long and read
    /// again.
    Held(Duration),
    /// The version stayed the same for a whole lease: take it.
    Expired,
}

/// A challenger's memory of the lease: which version it saw first and when
/// (its own monotonic clock). Pure: every method takes `now`.
#[derive(Clone, Debug, Default)]
pub struct Watch {
    seen: Option<(u64, Instant)>,
}

impl Watch {
    /// Reads `record`, seen at `now`.
    pub fn observe(&mut self, record: Option<&LeaseRecord>, now: Instant) -> Verdict {
        let Some(r) = record.filter(|r| !r.released) else {
            self.seen = None;
            return Verdict::Free;
        };
        let first = match self.seen {
            Some((v, at)) if v == r.version => at,
            _ => {
                self.seen = Some((r.version, now));
                now
            }
        };
        let lease = Duration::from_millis(r.lease_ms);
        let unchanged = now.saturating_duration_since(first);
        if unchanged >= lease {
            Verdict::Expired
        } else {
            Verdict::Held(lease - unchanged)
        }
    }
}

/// One controller's side of the lease: as a challenger ([`Lease::acquire`])
/// and as the holder ([`Lease::hold`], [`Lease::release`]).
pub struct Lease {
    client: aws_sdk_dynamodb::Client,
    table: String,
    config: LeaderConfig,
    fence: Fence,
    /// The item as last read or written.
    last: Mutex<Option<LeaseRecord>>,
    /// While leading: until when this controller may act.
    valid_until: Mutex<Option<Instant>>,
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Lease {
    /// The lease in `table`, for the controller `config` describes; leading
    /// sets `fence`. Does no I/O.
    pub fn new(
        client: aws_sdk_dynamodb::Client,
        table: &str,
        config: LeaderConfig,
        fence: Fence,
    ) -> Lease {
        Lease {
            client,
            table: table.to_owned(),
            config,
            fence,
            last: Mutex::new(None),
            valid_until: Mutex::new(None),
        }
    }

    pub fn config(&self) -> &LeaderConfig {
        &self.config
    }

    /// The item as last read or written.
    pub fn last(&self) -> Option<LeaseRecord> {
        self.last.lock().expect("lease lock").clone()
    }

    /// Whether this controller leads and may make a cloud call now.
    pub fn may_act(&self) -> bool {
        self.fence.version() != 0
            && self
                .valid_until
                .lock()
                .expect("lease lock")
                .is_some_and(|until| Instant::now() < until)
    }

    fn remote(&self, op: &'static str, detail: impl std::fmt::Display) -> LeaseError {
        LeaseError::Remote {
            table: self.table.clone(),
            op,
            detail: detail.to_string(),
        }
    }

    /// Reads the item (strongly consistent).
    pub async fn read(&self) -> Result<Option<LeaseRecord>, LeaseError> {
        let call = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(PK, AttributeValue::S(LEASE_PK.to_owned()))
            .key(SK, AttributeValue::S(LEASE_SK.to_owned()))
            .consistent_read(true)
            .send();
        let out = tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| self.remote("read", format!("no answer within {CALL_TIMEOUT:?}")))?
            .map_err(|e| self.remote("read", aws_sdk_dynamodb::error::DisplayErrorContext(e)))?;
        let record = match out.item {
            None => None,
            Some(item) => Some(decode(&item).map_err(|d| self.remote("read", d))?),
        };
        *self.last.lock().expect("lease lock") = record.clone();
        Ok(record)
    }

    /// Writes `next` if the item is still `expected` (absent when None).
    /// Returns false when another write came first.
    async fn swap(
        &self,
        op: &'static str,
        expected: Option<&LeaseRecord>,
        next: &LeaseRecord,
    ) -> Result<bool, LeaseError> {
        let mut put = self
            .client
            .put_item()
            .table_name(&self.table)
            .item(PK, AttributeValue::S(LEASE_PK.to_owned()))
            .item(SK, AttributeValue::S(LEASE_SK.to_owned()))
            .item("version", number(next.version))
            .item(TERM, number(next.term))
            .item("holder", AttributeValue::S(next.holder.clone()))
            .item("address", AttributeValue::S(next.address.clone()))
            .item("lease_ms", number(next.lease_ms))
            .item("since_ms", AttributeValue::N(next.since_ms.to_string()))
            .item("released", AttributeValue::Bool(next.released));
        put = match expected {
            None => put
                .condition_expression("attribute_not_exists(#pk)")
                .expression_attribute_names("#pk", PK),
            Some(e) => put
                .condition_expression("#v = :v AND #t = :t")
                .expression_attribute_names("#v", "version")
                .expression_attribute_names("#t", TERM)
                .expression_attribute_values(":v", number(e.version))
                .expression_attribute_values(":t", number(e.term)),
        };
        let answer = tokio::time::timeout(CALL_TIMEOUT, put.send())
            .await
            .map_err(|_| self.remote(op, format!("no answer within {CALL_TIMEOUT:?}")))?;
        match answer {
            Ok(_) => {
                *self.last.lock().expect("lease lock") = Some(next.clone());
                Ok(true)
            }
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_conditional_check_failed_exception()) =>
            {
                Ok(false)
            }
            Err(e) => Err(self.remote(op, aws_sdk_dynamodb::error::DisplayErrorContext(e))),
        }
    }

    /// Takes the lease from `observed` (what was read; None when there was
    /// no item) as a new term. True when this controller leads now.
    pub async fn take(&self, observed: Option<&LeaseRecord>) -> Result<bool, LeaseError> {
        let next = LeaseRecord {
            version: observed.map_or(1, |o| o.version + 1),
            term: observed.map_or(1, |o| o.term + 1),
            holder: self.config.name.clone(),
            address: self.config.advertise.clone(),
            lease_ms: self.config.lease.as_millis() as u64,
            since_ms: unix_ms(),
            released: false,
        };
        let sent = Instant::now();
        if self.swap("take", observed, &next).await? {
            self.fence.set(next.term);
            self.renewed_at(sent);
            Ok(true)
        } else {
            Ok(false)
        }
    }

    fn renewed_at(&self, sent: Instant) {
        let safe = self.config.lease.saturating_sub(self.config.heartbeat);
        *self.valid_until.lock().expect("lease lock") = Some(sent + safe);
    }

    /// Waits until this controller holds the lease: takes it at once when
    /// free, otherwise once its version stayed the same for a whole lease.
    /// `waiting` is called after every read (for logs and status).
    pub async fn acquire(
        &self,
        mut waiting: impl FnMut(Option<&LeaseRecord>, Verdict),
    ) -> Result<u64, LeaseError> {
        let mut watch = Watch::default();
        loop {
            let read = self.read().await;
            let pause = match read {
                Ok(record) => {
                    let verdict = watch.observe(record.as_ref(), Instant::now());
                    waiting(record.as_ref(), verdict);
                    match verdict {
                        Verdict::Free | Verdict::Expired => {
                            if self.take(record.as_ref()).await? {
                                return Ok(self.fence.version());
                            }
                            // Another challenger (or the holder) wrote
                            // first: read again at once.
                            Duration::ZERO
                        }
                        Verdict::Held(left) => left.min(self.config.heartbeat),
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the lease; trying again");
                    self.config.heartbeat
                }
            };
            tokio::time::sleep(pause).await;
        }
    }

    /// Renews the lease once: a new version under the same term.
    pub async fn renew(&self) -> Result<(), LeaseError> {
        let Some(mine) = self.last().filter(|r| {
            r.holder == self.config.name && r.term == self.fence.version() && !r.released
        }) else {
            return Err(LeaseError::Lost {
                table: self.table.clone(),
                by: "nobody (this controller does not hold it)".to_owned(),
            });
        };
        let next = LeaseRecord {
            version: mine.version + 1,
            ..mine.clone()
        };
        let sent = Instant::now();
        if self.swap("renew", Some(&mine), &next).await? {
            self.renewed_at(sent);
            return Ok(());
        }
        self.step_down();
        let by = match self.read().await {
            Ok(Some(r)) if r.released => "nobody (released)".to_owned(),
            Ok(Some(r)) => format!("{} at {}", r.holder, r.address),
            Ok(None) => "nobody (the item was deleted)".to_owned(),
            Err(_) => "another controller".to_owned(),
        };
        Err(LeaseError::Lost {
            table: self.table.clone(),
            by,
        })
    }

    /// Stops acting at once: no more fenced writes, no cloud calls.
    pub fn step_down(&self) {
        self.fence.set(0);
        *self.valid_until.lock().expect("lease lock") = None;
    }

    /// Renews every heartbeat until the lease is lost or cannot be renewed
    /// in time; then steps down and returns why. Never returns while this
    /// controller may act.
    pub async fn hold(&self) -> LeaseError {
        loop {
            let until = *self.valid_until.lock().expect("lease lock");
            let Some(until) = until else {
                self.step_down();
                return LeaseError::Lost {
                    table: self.table.clone(),
                    by: "nobody (this controller does not hold it)".to_owned(),
                };
            };
            let next = Instant::now() + self.config.heartbeat;
            tokio::select! {
                _ = tokio::time::sleep_until(until) => {
                    self.step_down();
                    return LeaseError::Expired {
                        table: self.table.clone(),
                        within: self.config.lease.saturating_sub(self.config.heartbeat),
                    };
                }
                _ = tokio::time::sleep_until(next) => {}
            }
            match self.renew().await {
                Ok(()) => {}
                Err(e @ LeaseError::Lost { .. }) => return e,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot renew the lease; trying again");
                    if !self.may_act() {
                        self.step_down();
                        return LeaseError::Expired {
                            table: self.table.clone(),
                            within: self.config.lease.saturating_sub(self.config.heartbeat),
                        };
                    }
                }
            }
        }
    }

    /// Hands the lease back (a clean stop), so a standby takes it at once.
    pub async fn release(&self) -> Result<(), LeaseError> {
        let Some(mine) = self
            .last()
            .filter(|r| r.holder == self.config.name && r.term == self.fence.version())
        else {
            return Ok(());
        };
        self.step_down();
        let next = LeaseRecord {
            version: mine.version + 1,
            released: true,
            ..mine.clone()
        };
        self.swap("release", Some(&mine), &next).await.map(drop)
    }
}

impl Leadership for Lease {
    fn status(&self) -> LeaseStatus {
        let last = self.last();
        let holder = last.as_ref().filter(|r| !r.released);
        LeaseStatus {
            controller: self.config.name.clone(),
            leading: self.may_act(),
            leader: holder.map(|r| r.holder.clone()).unwrap_or_default(),
            leader_address: holder.map(|r| r.address.clone()).unwrap_or_default(),
            leader_since_ms: holder.map_or(0, |r| r.since_ms),
            version: last.as_ref().map_or(0, |r| r.version),
            duration_ms: self.config.lease.as_millis() as i64,
            store: format!("dynamodb:{}", self.table),
        }
    }
}

fn number(n: u64) -> AttributeValue {
    AttributeValue::N(n.to_string())
}

fn decode(item: &std::collections::HashMap<String, AttributeValue>) -> Result<LeaseRecord, String> {
    let n = |k: &str| -> Result<i64, String> {
        item.get(k)
            .and_then(|v| v.as_n().ok())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("the lease item has no number {k}"))
    };
    let s = |k: &str| -> Result<String, String> {
        item.get(k)
            .and_then(|v| v.as_s().ok())
            .cloned()
            .ok_or_else(|| format!("the lease item has no string {k}"))
    };
    Ok(LeaseRecord {
        version: n("version")? as u64,
        term: n(TERM)? as u64,
        holder: s("holder")?,
        address: s("address")?,
        lease_ms: n("lease_ms")? as u64,
        since_ms: n("since_ms")?,
        released: item
            .get("released")
            .and_then(|v| v.as_bool().ok())
            .copied()
            .unwrap_or(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(version: u64, lease_ms: u64) -> LeaseRecord {
        LeaseRecord {
            version,
            term: 1,
            holder: "a".into(),
            address: "https://a:7070".into(),
            lease_ms,
            since_ms: 0,
            released: false,
        }
    }

    #[test]
    fn a_lease_is_taken_only_after_its_version_stood_still_for_a_whole_lease() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut w = Watch::default();
        assert_eq!(w.observe(None, t0), Verdict::Free);
        assert_eq!(
            w.observe(Some(&record(7, 15_000)), t0),
            Verdict::Held(15 * s)
        );
        assert_eq!(
            w.observe(Some(&record(7, 15_000)), t0 + 10 * s),
            Verdict::Held(5 * s)
        );
        // Renewed: the count starts again from when the new version was
        // first seen, whatever the holder's clock says.
        assert_eq!(
            w.observe(Some(&record(8, 15_000)), t0 + 14 * s),
            Verdict::Held(15 * s)
        );
        assert_eq!(
            w.observe(Some(&record(8, 15_000)), t0 + 28 * s),
            Verdict::Held(s)
        );
        assert_eq!(
            w.observe(Some(&record(8, 15_000)), t0 + 29 * s),
            Verdict::Expired
        );
        // Released: free at once.
        let mut released = record(9, 15_000);
        released.released = true;
        assert_eq!(w.observe(Some(&released), t0 + 29 * s), Verdict::Free);
    }

    #[test]
    fn the_holders_own_lease_duration_counts() {
        let t0 = Instant::now();
        let mut w = Watch::default();
        w.observe(Some(&record(1, 2_000)), t0);
        assert_eq!(
            w.observe(Some(&record(1, 2_000)), t0 + Duration::from_secs(2)),
            Verdict::Expired
        );
    }
}
