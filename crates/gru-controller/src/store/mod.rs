//! What the controller keeps across a restart, including a SIGKILL at any
//! moment: each minion's row, each fleet's operator overrides and policy
//! memory, the decrement ledger and the event log.
//!
//! Start reading at [`Store`]; [`sqlite::SqliteStore`] is the backend for
//! one controller, gru-aws's `DynamoStore` the one for several (active and
//! standbys, DESIGN.md "High availability").
//!
//! Invariants:
//! - Only state changes are written, never the minions' periodic reports, so
//!   writes are rare and each one can afford a full sync.
//! - The store never reads a clock: every timestamp is unix milliseconds
//!   chosen by the caller.
//! - Rows are plain text and integers; the caller parses lifecycle states and
//!   serializes the policy's memory, so this module knows no domain types and
//!   a change to them needs no schema migration.
//! - A file the store cannot fully understand (not SQLite, damaged, written
//!   by a newer gru, missing tables) is refused and left byte-for-byte as it
//!   was, never repaired or recreated over.

use std::path::PathBuf;

pub mod conformance;
pub mod examples;
pub mod sqlite;

pub use sqlite::SqliteStore;

/// The schema this build writes and the newest it can read. Bumped by every
/// migration added in [`sqlite`].
pub const SCHEMA_VERSION: u32 = 3;

/// The controller's durable memory. Every method is one atomic write or one
/// consistent read: after it returns `Ok`, what it wrote survives a crash.
pub trait Store: Send + Sync + 'static {
    /// Where the store lives, for messages (a file path, or
    /// "dynamodb:<table>").
    fn location(&self) -> PathBuf;
    /// The backend's name: "sqlite", "dynamodb".
    fn kind(&self) -> &'static str {
        "sqlite"
    }
    /// Everything needed to resume: all minion rows, fleet rows, ledger rows.
    fn load(&self) -> Result<Loaded, StoreError>;
    /// Inserts or replaces one minion row (by id).
    fn put_minion(&self, m: &MinionRow) -> Result<(), StoreError>;
    /// Inserts or replaces one minion row and appends its events in one
    /// transaction: a state change and the event that records it land
    /// together or not at all.
    fn put_minion_with_events(&self, m: &MinionRow, events: &[EventRow]) -> Result<(), StoreError>;
    /// Forgets a minion (long Gone); its events stay.
    fn delete_minion(&self, id: &str) -> Result<(), StoreError>;
    /// Inserts or replaces one fleet row (by name).
    fn put_fleet(&self, f: &FleetRow) -> Result<(), StoreError>;

    /// Replaces fleet `h.name`'s demand history (the forecast's). Kept
    /// apart from the fleet's row: it is large (tens of KB for 8 days) and
    /// changes slowly, so it is written on its own, less often.
    fn put_fleet_history(&self, h: &HistoryRow) -> Result<(), StoreError>;
    /// Records that a decrementing terminate may go out for `instance`.
    /// Returns true if this call claimed it (no earlier claim that is still
    /// standing), false if an earlier claim exists (the caller must then
    /// terminate WITHOUT decrement).
    ///
    /// This is what keeps the group's desired capacity from being
    /// decremented twice for one instance: the claim is durable before the
    /// cloud call goes out, so a controller killed between the two finds it
    /// on restart and does not decrement again.
    fn claim_decrement(
        &self,
        instance: &str,
        minion: &str,
        fleet: &str,
        at_ms: i64,
    ) -> Result<bool, StoreError>;
    /// The cloud certainly did not apply the decrementing call (a 4xx): drop
    /// the claim so a later call may decrement. A confirmed claim is never
    /// dropped; releasing one, or an instance with no claim, does nothing.
    fn release_decrement(&self, instance: &str) -> Result<(), StoreError>;
    /// The cloud confirmed the decrementing call: mark the claim done (kept,
    /// never claimable again). Confirming twice keeps the first time; an
    /// instance with no claim is [`StoreError::NoClaim`].
    fn confirm_decrement(&self, instance: &str, at_ms: i64) -> Result<(), StoreError>;
    /// Appends events in one transaction, assigning each a sequence number
    /// (returned, in order). The `seq` of the given rows is ignored. Sequence
    /// numbers only grow and are never reused, even after a prune.
    fn append_events(&self, events: &[EventRow]) -> Result<Vec<u64>, StoreError>;
    /// Events with at_ms >= since_ms (all fleets when fleet is None), oldest
    /// first, at most `limit` (the newest `limit` of them if more match).
    ///
    /// "Oldest" is by sequence number, i.e. the order they were appended:
    /// the one order the store guarantees even when several events share a
    /// millisecond or the caller's clock stepped back.
    fn events_since(
        &self,
        since_ms: i64,
        fleet: Option<&str>,
        limit: usize,
    ) -> Result<Vec<EventRow>, StoreError>;
    /// The events naming one minion (its transitions, steps and warnings),
    /// oldest first, at most `limit` (the newest if more match), for
    /// `gru minion get` history.
    fn minion_events(&self, minion: &str, limit: usize) -> Result<Vec<EventRow>, StoreError>;
    /// Deletes events older than before_ms; returns how many.
    fn prune_events(&self, before_ms: i64) -> Result<u64, StoreError>;
    /// Records that `instance` joined with its identity document. Returns
    /// the time of an earlier such join instead, if there was one: an
    /// instance proves itself with its document once, and later with the
    /// certificate it was issued.
    fn claim_identity_join(
        &self,
        instance: &str,
        fleet: &str,
        at_ms: i64,
    ) -> Result<Option<i64>, StoreError>;
    /// Lets `instance` join with its identity document again (`gru minion
    /// forget`). Returns the fleet it had joined, if it had.
    fn forget_identity_join(&self, instance: &str) -> Result<Option<String>, StoreError>;
}

/// One minion as it must be known again after a restart.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MinionRow {
    /// The controller's stable id, which outlives instance replacement.
    pub id: String,
    pub fleet: String,
    pub instance: String,
    /// The lifecycle state as text, e.g. "InService" or "Draining:Flushing";
    /// the caller parses it.
    pub state: String,
    pub state_since_ms: i64,
    pub created_ms: i64,
    pub engine_address: Option<String>,
    /// Whether it is registered with the load balancer, so a restart knows
    /// whether a deregistration is still owed.
    pub registered: bool,
    /// Why and how it is being drained, once a drain was decided.
    pub drain: Option<DrainRow>,
    /// Whether the launch lifecycle hook was completed, so it is not
    /// completed twice.
    pub launch_completed: bool,
    /// Whether the termination lifecycle hook was completed.
    pub termination_completed: bool,
    /// When the termination hook's timeout was last extended.
    pub hook_heartbeat_ms: Option<i64>,
    /// When it was deregistered from the load balancer (deregistration delay
    /// runs from here).
    pub deregistered_ms: Option<i64>,
}

/// The drain intent: kept so a restarted controller finishes the same drain
/// rather than deciding again.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DrainRow {
    /// Whether the terminate at the end should decrement desired capacity
    /// (a scale-in) or not (a replacement).
    pub decrement: bool,
    pub reason: String,
    /// Whether "drain overdue" was already reported, so it is reported once.
    pub overdue_reported: bool,
}

/// One fleet's operator overrides and policy memory; the fleet's shape comes
/// from config, not from here.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FleetRow {
    pub name: String,
    /// Set while scaling is paused by an operator.
    pub paused: Option<Origin>,
    pub pin: Option<PinRow>,
    /// The policy's memory, serialized by the caller; empty when none.
    pub policy_memory: String,
}

/// One fleet's demand history, serialized by the caller.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HistoryRow {
    pub name: String,
    pub history: String,
}

/// Who set an override and when ("admin CN=alice", "gru dev", "unknown").
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Origin {
    pub by: String,
    pub at_ms: i64,
}

/// An operator's fixed desired capacity.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PinRow {
    pub desired: u32,
    /// When the pin lapses by itself; None holds it until removed.
    pub until_ms: Option<i64>,
    pub origin: Origin,
}

/// One decrement claim (see [`Store::claim_decrement`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LedgerRow {
    pub instance: String,
    pub minion: String,
    pub fleet: String,
    pub asked_ms: i64,
    /// Set once the cloud confirmed the decrement; until then a restarted
    /// controller cannot know whether it was applied, so it must not
    /// decrement again.
    pub confirmed_ms: Option<i64>,
}

/// One entry of the event log.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EventRow {
    /// Assigned by the store; 0 on rows not yet appended.
    pub seq: u64,
    pub at_ms: i64,
    pub fleet: String,
    pub minion: Option<String>,
    /// "transition", "decision", "scale", "step", "warning", "admin"…
    pub kind: String,
    pub message: String,
    /// For transitions: the states before and after.
    pub from: Option<String>,
    pub to: Option<String>,
    /// Who caused it, when known (admin actions).
    pub actor: Option<String>,
}

/// What [`Store::load`] returns, each list sorted by its key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Loaded {
    pub minions: Vec<MinionRow>,
    pub fleets: Vec<FleetRow>,
    pub ledger: Vec<LedgerRow>,
    pub histories: Vec<HistoryRow>,
}

/// Every error names the database file (or its directory) involved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The directory could not be made, or the file could not be examined.
    #[error("failed to {op} {path}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// SQLite could not open the file for a reason other than its contents
    /// (permissions, a lock held too long, out of memory).
    #[error("failed to open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    /// The file is not a store this gru can use as it stands: not SQLite,
    /// damaged, or missing parts of the schema. It was left untouched.
    #[error("{path}: {detail}; refusing to touch it")]
    Corrupt {
        path: PathBuf,
        detail: String,
        /// SQLite's own complaint, when it had one.
        #[source]
        source: Option<rusqlite::Error>,
    },
    /// The file's schema is newer than this build understands; writing to it
    /// could destroy what the newer gru relies on. It was left untouched.
    #[error(
        "{path}: written by a newer gru (schema version {found}; this gru reads up to {supported}); refusing to touch it"
    )]
    Newer {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    /// A query failed on an open store.
    #[error("failed to {op} in {path}")]
    Sqlite {
        path: PathBuf,
        /// What was being done, naming the object: "put minion m-12".
        op: String,
        #[source]
        source: rusqlite::Error,
    },
    /// A row was read but does not make a valid value (the schema's checks
    /// should make this impossible; it means the file was edited by hand).
    #[error("{path}: cannot read back {what}: {detail}")]
    Decode {
        path: PathBuf,
        /// The row: "minion m-12".
        what: String,
        detail: String,
    },
    /// [`Store::confirm_decrement`] for an instance that holds no claim: the
    /// caller lost track of its own claim.
    #[error("{path}: no decrement claim to confirm for instance {instance}")]
    NoClaim { path: PathBuf, instance: String },
    /// A call to a store over the network (DynamoDB) failed or was not
    /// answered; what it wrote may or may not have landed.
    #[error("{path}: failed to {op}: {detail}")]
    Remote {
        path: PathBuf,
        /// What was being done, naming the object: "put minion m-12".
        op: String,
        detail: String,
    },
    /// A write refused because this controller does not hold the leader
    /// lease it was made under: another controller leads now, and this one
    /// must stop acting (it steps down).
    #[error(
        "{path}: {op} refused: this controller no longer holds the leader lease (version {version})"
    )]
    Fenced {
        path: PathBuf,
        op: String,
        version: u64,
    },
}

impl StoreError {
    /// Whether this error means the controller was deposed.
    pub fn is_fenced(&self) -> bool {
        matches!(self, StoreError::Fenced { .. })
    }
}
