//! The SQLite backend of [`Store`]: one file, `<dir>/gru-controller.db`.
//!
//! Opening is in two phases so that a file we cannot use is never written:
//! `inspect` looks at it read-only (its header with plain file reads, then
//! SQLite's version, integrity check and schema), and only a file that passes
//! is reopened read-write, switched to WAL and migrated.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags, Row, TransactionBehavior};

use super::{
    DrainRow, EventRow, FleetRow, HistoryRow, LedgerRow, Loaded, MinionRow, Origin, PinRow,
    SCHEMA_VERSION, Store, StoreError,
};

/// The database's file name inside the store directory.
pub const DB_FILE: &str = "gru-controller.db";

/// How long a statement waits for another connection's lock (a second
/// process on the same file, or a checkpoint) before failing. Writes are
/// small, so anything longer than this is a stuck peer, not contention.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The first 16 bytes of every SQLite 3 database file.
const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// The size of the database header at the start of the file.
const HEADER_LEN: usize = 100;

/// How many lines of a failed integrity check go into the error.
const QUICK_CHECK_LINES: usize = 5;

/// Schema migrations: entry `i` takes the schema from version `i` to `i + 1`,
/// and runs in one transaction together with the `user_version` bump, so a
/// crash leaves the file at one version or the next. Adding version 2 is
/// adding one entry here, bumping [`SCHEMA_VERSION`] and updating
/// [`EXPECTED_SCHEMA`].
const MIGRATIONS: &[&str] = &[V1, V2, V3];

/// Version 3: each fleet's demand history, apart from its row (it is
/// large and written less often).
const V3: &str = "
CREATE TABLE fleet_history (
    name TEXT NOT NULL PRIMARY KEY,
    history TEXT NOT NULL
) STRICT;
";

/// Version 2: instances that joined with their identity document, each
/// once (a document replayed later is refused).
const V2: &str = "
CREATE TABLE identity_joins (
    instance TEXT NOT NULL PRIMARY KEY,
    fleet TEXT NOT NULL,
    joined_ms INTEGER NOT NULL
) STRICT;
";

const _: () = assert!(
    MIGRATIONS.len() == SCHEMA_VERSION as usize,
    "one migration per schema version"
);

/// Version 1. Tables are STRICT so a value of the wrong type is refused on
/// write rather than discovered on read; the CHECKs keep optional groups of
/// columns (a drain, a pause, a pin) all set or all unset, so every row reads
/// back as a valid value.
const V1: &str = "
CREATE TABLE minions (
    id TEXT NOT NULL PRIMARY KEY,
    fleet TEXT NOT NULL,
    instance TEXT NOT NULL,
    state TEXT NOT NULL,
    state_since_ms INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    engine_address TEXT,
    registered INTEGER NOT NULL CHECK (registered IN (0, 1)),
    drain_decrement INTEGER CHECK (drain_decrement IN (0, 1)),
    drain_reason TEXT,
    drain_overdue_reported INTEGER CHECK (drain_overdue_reported IN (0, 1)),
    launch_completed INTEGER NOT NULL CHECK (launch_completed IN (0, 1)),
    termination_completed INTEGER NOT NULL CHECK (termination_completed IN (0, 1)),
    hook_heartbeat_ms INTEGER,
    deregistered_ms INTEGER,
    CHECK ((drain_decrement IS NULL) = (drain_reason IS NULL)
       AND (drain_reason IS NULL) = (drain_overdue_reported IS NULL))
) STRICT;

CREATE TABLE fleets (
    name TEXT NOT NULL PRIMARY KEY,
    paused_by TEXT,
    paused_at_ms INTEGER,
    pin_desired INTEGER CHECK (pin_desired BETWEEN 0 AND 4294967295),
    pin_until_ms INTEGER,
    pin_by TEXT,
    pin_at_ms INTEGER,
    policy_memory TEXT NOT NULL,
    CHECK ((paused_by IS NULL) = (paused_at_ms IS NULL)),
    CHECK ((pin_desired IS NULL) = (pin_by IS NULL)
       AND (pin_by IS NULL) = (pin_at_ms IS NULL)),
    CHECK (pin_desired IS NOT NULL OR pin_until_ms IS NULL)
) STRICT;

-- No foreign key to minions: a claim outlives the minion row, since the
-- instance must never be decremented for again.
CREATE TABLE ledger (
    instance TEXT NOT NULL PRIMARY KEY,
    minion TEXT NOT NULL,
    fleet TEXT NOT NULL,
    asked_ms INTEGER NOT NULL,
    confirmed_ms INTEGER
) STRICT;

-- AUTOINCREMENT so a sequence number is never reused after the newest
-- events are pruned: a client paging by seq never sees two events as one.
CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    fleet TEXT NOT NULL,
    minion TEXT,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    from_state TEXT,
    to_state TEXT,
    actor TEXT
) STRICT;

CREATE INDEX events_by_time ON events (at_ms);
CREATE INDEX events_by_minion ON events (minion);
";

/// The tables and columns of [`SCHEMA_VERSION`], checked before a file at
/// that version is written to. Kept beside [`V1`] by hand; the tests open a
/// freshly migrated file through this check.
const EXPECTED_SCHEMA: &[(&str, &[&str])] = &[
    (
        "minions",
        &[
            "id",
            "fleet",
            "instance",
            "state",
            "state_since_ms",
            "created_ms",
            "engine_address",
            "registered",
            "drain_decrement",
            "drain_reason",
            "drain_overdue_reported",
            "launch_completed",
            "termination_completed",
            "hook_heartbeat_ms",
            "deregistered_ms",
        ],
    ),
    (
        "fleets",
        &[
            "name",
            "paused_by",
            "paused_at_ms",
            "pin_desired",
            "pin_until_ms",
            "pin_by",
            "pin_at_ms",
            "policy_memory",
        ],
    ),
    (
        "ledger",
        &["instance", "minion", "fleet", "asked_ms", "confirmed_ms"],
    ),
    ("identity_joins", &["instance", "fleet", "joined_ms"]),
    ("fleet_history", &["name", "history"]),
    (
        "events",
        &[
            "seq",
            "at_ms",
            "fleet",
            "minion",
            "kind",
            "message",
            "from_state",
            "to_state",
            "actor",
        ],
    ),
];

const EVENT_COLUMNS: &str = "seq, at_ms, fleet, minion, kind, message, from_state, to_state, actor";

/// The durable store in one SQLite file.
///
/// One connection behind a mutex: writes are rare and small, and a single
/// connection makes every method trivially serialized within the process.
/// The mutex is held only for the duration of one method, never across an
/// `.await` (no method is async).
#[derive(Debug)]
pub struct SqliteStore {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl SqliteStore {
    /// One minion row, on `conn` (a transaction or not).
    fn write_minion(&self, conn: &rusqlite::Connection, m: &MinionRow) -> Result<(), StoreError> {
        conn.prepare_cached(
            "INSERT OR REPLACE INTO minions (id, fleet, instance, state, state_since_ms,
                created_ms, engine_address, registered, drain_decrement, drain_reason,
                drain_overdue_reported, launch_completed, termination_completed,
                hook_heartbeat_ms, deregistered_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
        )
        .and_then(|mut stmt| {
            stmt.execute(rusqlite::params![
                m.id,
                m.fleet,
                m.instance,
                m.state,
                m.state_since_ms,
                m.created_ms,
                m.engine_address,
                m.registered,
                m.drain.as_ref().map(|d| d.decrement),
                m.drain.as_ref().map(|d| d.reason.as_str()),
                m.drain.as_ref().map(|d| d.overdue_reported),
                m.launch_completed,
                m.termination_completed,
                m.hook_heartbeat_ms,
                m.deregistered_ms,
            ])
        })
        .map_err(self.sql_err(format!("put minion {}", m.id)))?;
        Ok(())
    }

    /// Events appended on `conn`, inside the caller's transaction.
    fn write_events(
        &self,
        conn: &rusqlite::Connection,
        events: &[EventRow],
    ) -> Result<Vec<u64>, StoreError> {
        let op = || format!("append {} events", events.len());
        let mut stmt = conn
            .prepare_cached(
                "INSERT INTO events (at_ms, fleet, minion, kind, message, from_state,
                    to_state, actor)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
            .map_err(self.sql_err(op()))?;
        let mut seqs = Vec::with_capacity(events.len());
        for e in events {
            let seq = stmt
                .insert(rusqlite::params![
                    e.at_ms, e.fleet, e.minion, e.kind, e.message, e.from, e.to, e.actor,
                ])
                .map_err(self.sql_err(op()))?;
            seqs.push(self.seq(seq)?);
        }
        Ok(seqs)
    }

    /// Opens the store in `dir`, creating the directory (mode 0700 on unix:
    /// the file holds who paused what and the fleet's state) and the
    /// database when missing. A file that is missing or empty is a new
    /// store; any other file must be a gru store this build can read, or it
    /// is refused and left exactly as it was.
    pub fn open(dir: &Path) -> Result<SqliteStore, StoreError> {
        create_dir(dir)?;
        let path = dir.join(DB_FILE);
        inspect(&path)?;

        // The file passed inspection (or is new): only now is it written to.
        // Not SQLITE_OPEN_URI: the path is a file name, whatever it holds.
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let mut conn =
            Connection::open_with_flags(&path, flags).map_err(|source| StoreError::Open {
                path: path.clone(),
                source,
            })?;
        configure(&conn, &path)?;
        migrate(&mut conn, &path)?;
        Ok(SqliteStore {
            path,
            conn: Mutex::new(conn),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The connection. A panic while it was held cannot have left it half
    /// way through a write: each write is one statement or a transaction
    /// that rolls back when dropped during the unwind. So a poisoned lock is
    /// taken over rather than failing every later call.
    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn sql_err(&self, op: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> StoreError + '_ {
        let op = op.into();
        move |source| StoreError::Sqlite {
            path: self.path.clone(),
            op,
            source,
        }
    }

    fn decode_err(&self, what: String, detail: impl Into<String>) -> StoreError {
        StoreError::Decode {
            path: self.path.clone(),
            what,
            detail: detail.into(),
        }
    }

    fn flag(&self, value: i64, what: &str, column: &str) -> Result<bool, StoreError> {
        match value {
            0 => Ok(false),
            1 => Ok(true),
            other => {
                Err(self.decode_err(what.to_owned(), format!("{column} is {other}, not 0 or 1")))
            }
        }
    }

    fn minion_from(&self, row: &Row<'_>) -> Result<MinionRow, StoreError> {
        let err = |e| self.sql_err("read a minion row")(e);
        let id: String = row.get("id").map_err(err)?;
        let what = format!("minion {id}");
        let drain = match (
            row.get::<_, Option<i64>>("drain_decrement").map_err(err)?,
            row.get::<_, Option<String>>("drain_reason").map_err(err)?,
            row.get::<_, Option<i64>>("drain_overdue_reported")
                .map_err(err)?,
        ) {
            (None, None, None) => None,
            (Some(decrement), Some(reason), Some(overdue)) => Some(DrainRow {
                decrement: self.flag(decrement, &what, "drain_decrement")?,
                reason,
                overdue_reported: self.flag(overdue, &what, "drain_overdue_reported")?,
            }),
            _ => return Err(self.decode_err(what, "drain columns are partly set")),
        };
        Ok(MinionRow {
            fleet: row.get("fleet").map_err(err)?,
            instance: row.get("instance").map_err(err)?,
            state: row.get("state").map_err(err)?,
            state_since_ms: row.get("state_since_ms").map_err(err)?,
            created_ms: row.get("created_ms").map_err(err)?,
            engine_address: row.get("engine_address").map_err(err)?,
            registered: self.flag(row.get("registered").map_err(err)?, &what, "registered")?,
            drain,
            launch_completed: self.flag(
                row.get("launch_completed").map_err(err)?,
                &what,
                "launch_completed",
            )?,
            termination_completed: self.flag(
                row.get("termination_completed").map_err(err)?,
                &what,
                "termination_completed",
            )?,
            hook_heartbeat_ms: row.get("hook_heartbeat_ms").map_err(err)?,
            deregistered_ms: row.get("deregistered_ms").map_err(err)?,
            id,
        })
    }

    fn fleet_from(&self, row: &Row<'_>) -> Result<FleetRow, StoreError> {
        let err = |e| self.sql_err("read a fleet row")(e);
        let name: String = row.get("name").map_err(err)?;
        let what = format!("fleet {name}");
        let paused = match (
            row.get::<_, Option<String>>("paused_by").map_err(err)?,
            row.get::<_, Option<i64>>("paused_at_ms").map_err(err)?,
        ) {
            (None, None) => None,
            (Some(by), Some(at_ms)) => Some(Origin { by, at_ms }),
            _ => return Err(self.decode_err(what, "pause columns are partly set")),
        };
        let pin = match (
            row.get::<_, Option<i64>>("pin_desired").map_err(err)?,
            row.get::<_, Option<i64>>("pin_until_ms").map_err(err)?,
            row.get::<_, Option<String>>("pin_by").map_err(err)?,
            row.get::<_, Option<i64>>("pin_at_ms").map_err(err)?,
        ) {
            (None, None, None, None) => None,
            (Some(desired), until_ms, Some(by), Some(at_ms)) => Some(PinRow {
                desired: u32::try_from(desired).map_err(|_| {
                    self.decode_err(what.clone(), format!("pin_desired {desired} is not a u32"))
                })?,
                until_ms,
                origin: Origin { by, at_ms },
            }),
            _ => return Err(self.decode_err(what, "pin columns are partly set")),
        };
        Ok(FleetRow {
            paused,
            pin,
            policy_memory: row.get("policy_memory").map_err(err)?,
            name,
        })
    }

    fn ledger_from(&self, row: &Row<'_>) -> Result<LedgerRow, StoreError> {
        let err = |e| self.sql_err("read a ledger row")(e);
        Ok(LedgerRow {
            instance: row.get("instance").map_err(err)?,
            minion: row.get("minion").map_err(err)?,
            fleet: row.get("fleet").map_err(err)?,
            asked_ms: row.get("asked_ms").map_err(err)?,
            confirmed_ms: row.get("confirmed_ms").map_err(err)?,
        })
    }

    fn event_from(&self, row: &Row<'_>) -> Result<EventRow, StoreError> {
        let err = |e| self.sql_err("read an event row")(e);
        let seq: i64 = row.get("seq").map_err(err)?;
        Ok(EventRow {
            seq: self.seq(seq)?,
            at_ms: row.get("at_ms").map_err(err)?,
            fleet: row.get("fleet").map_err(err)?,
            minion: row.get("minion").map_err(err)?,
            kind: row.get("kind").map_err(err)?,
            message: row.get("message").map_err(err)?,
            from: row.get("from_state").map_err(err)?,
            to: row.get("to_state").map_err(err)?,
            actor: row.get("actor").map_err(err)?,
        })
    }

    fn seq(&self, seq: i64) -> Result<u64, StoreError> {
        u64::try_from(seq)
            .map_err(|_| self.decode_err(format!("event {seq}"), "the sequence number is negative"))
    }

    /// Runs `SELECT <event columns> FROM events <tail>`, where the tail
    /// picks the newest events (`ORDER BY seq DESC LIMIT ..`), and returns
    /// them oldest first.
    fn newest_events(
        &self,
        op: &str,
        tail: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<EventRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(&format!("SELECT {EVENT_COLUMNS} FROM events {tail}"))
            .map_err(self.sql_err(op))?;
        let mut rows = stmt.query(params).map_err(self.sql_err(op))?;
        let mut events = Vec::new();
        while let Some(row) = rows.next().map_err(self.sql_err(op))? {
            events.push(self.event_from(row)?);
        }
        events.reverse();
        Ok(events)
    }
}

impl Store for SqliteStore {
    fn location(&self) -> PathBuf {
        self.path().to_owned()
    }

    fn load(&self) -> Result<Loaded, StoreError> {
        let mut conn = self.conn();
        // One read transaction: the three tables as of one moment.
        let tx = conn.transaction().map_err(self.sql_err("begin load"))?;
        let mut loaded = Loaded::default();
        {
            let op = "load minions";
            let mut stmt = tx
                .prepare("SELECT * FROM minions ORDER BY id")
                .map_err(self.sql_err(op))?;
            let mut rows = stmt.query([]).map_err(self.sql_err(op))?;
            while let Some(row) = rows.next().map_err(self.sql_err(op))? {
                loaded.minions.push(self.minion_from(row)?);
            }
        }
        {
            let op = "load fleets";
            let mut stmt = tx
                .prepare("SELECT * FROM fleets ORDER BY name")
                .map_err(self.sql_err(op))?;
            let mut rows = stmt.query([]).map_err(self.sql_err(op))?;
            while let Some(row) = rows.next().map_err(self.sql_err(op))? {
                loaded.fleets.push(self.fleet_from(row)?);
            }
        }
        {
            let op = "load the ledger";
            let mut stmt = tx
                .prepare("SELECT * FROM ledger ORDER BY instance")
                .map_err(self.sql_err(op))?;
            let mut rows = stmt.query([]).map_err(self.sql_err(op))?;
            while let Some(row) = rows.next().map_err(self.sql_err(op))? {
                loaded.ledger.push(self.ledger_from(row)?);
            }
        }
        {
            let op = "load fleet histories";
            let mut stmt = tx
                .prepare("SELECT name, history FROM fleet_history ORDER BY name")
                .map_err(self.sql_err(op))?;
            let mut rows = stmt.query([]).map_err(self.sql_err(op))?;
            while let Some(row) = rows.next().map_err(self.sql_err(op))? {
                loaded.histories.push(HistoryRow {
                    name: row.get(0).map_err(self.sql_err(op))?,
                    history: row.get(1).map_err(self.sql_err(op))?,
                });
            }
        }
        tx.commit().map_err(self.sql_err("end load"))?;
        Ok(loaded)
    }

    fn put_minion(&self, m: &MinionRow) -> Result<(), StoreError> {
        self.write_minion(&self.conn(), m)
    }

    fn put_minion_with_events(&self, m: &MinionRow, events: &[EventRow]) -> Result<(), StoreError> {
        let op = || format!("put minion {} with its events", m.id);
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sql_err(op()))?;
        self.write_minion(&tx, m)?;
        self.write_events(&tx, events)?;
        tx.commit().map_err(self.sql_err(op()))?;
        Ok(())
    }

    fn delete_minion(&self, id: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM minions WHERE id = ?1", [id])
            .map_err(self.sql_err(format!("delete minion {id}")))?;
        Ok(())
    }

    fn put_fleet(&self, f: &FleetRow) -> Result<(), StoreError> {
        let conn = self.conn();
        conn.prepare_cached(
            "INSERT OR REPLACE INTO fleets (name, paused_by, paused_at_ms, pin_desired,
                pin_until_ms, pin_by, pin_at_ms, policy_memory)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )
        .and_then(|mut stmt| {
            stmt.execute(rusqlite::params![
                f.name,
                f.paused.as_ref().map(|o| o.by.as_str()),
                f.paused.as_ref().map(|o| o.at_ms),
                f.pin.as_ref().map(|p| p.desired),
                f.pin.as_ref().and_then(|p| p.until_ms),
                f.pin.as_ref().map(|p| p.origin.by.as_str()),
                f.pin.as_ref().map(|p| p.origin.at_ms),
                f.policy_memory,
            ])
        })
        .map_err(self.sql_err(format!("put fleet {}", f.name)))?;
        Ok(())
    }

    fn put_fleet_history(&self, h: &HistoryRow) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached("INSERT OR REPLACE INTO fleet_history (name, history) VALUES (?1, ?2)")
            .and_then(|mut stmt| stmt.execute(rusqlite::params![h.name, h.history]))
            .map_err(self.sql_err(format!("put the history of fleet {}", h.name)))?;
        Ok(())
    }

    fn claim_decrement(
        &self,
        instance: &str,
        minion: &str,
        fleet: &str,
        at_ms: i64,
    ) -> Result<bool, StoreError> {
        // One statement, so atomic even against another process on the file:
        // the primary key lets exactly one claim per instance in.
        let inserted = self
            .conn()
            .execute(
                "INSERT INTO ledger (instance, minion, fleet, asked_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (instance) DO NOTHING",
                rusqlite::params![instance, minion, fleet, at_ms],
            )
            .map_err(self.sql_err(format!("claim the decrement for instance {instance}")))?;
        Ok(inserted == 1)
    }

    fn release_decrement(&self, instance: &str) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "DELETE FROM ledger WHERE instance = ?1 AND confirmed_ms IS NULL",
                [instance],
            )
            .map_err(self.sql_err(format!("release the decrement for instance {instance}")))?;
        Ok(())
    }

    fn confirm_decrement(&self, instance: &str, at_ms: i64) -> Result<(), StoreError> {
        let updated = self
            .conn()
            .execute(
                "UPDATE ledger SET confirmed_ms = coalesce(confirmed_ms, ?2) WHERE instance = ?1",
                rusqlite::params![instance, at_ms],
            )
            .map_err(self.sql_err(format!("confirm the decrement for instance {instance}")))?;
        if updated == 0 {
            return Err(StoreError::NoClaim {
                path: self.path.clone(),
                instance: instance.to_owned(),
            });
        }
        Ok(())
    }

    fn append_events(&self, events: &[EventRow]) -> Result<Vec<u64>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let op = || format!("append {} events", events.len());
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sql_err(op()))?;
        let seqs = self.write_events(&tx, events)?;
        tx.commit().map_err(self.sql_err(op()))?;
        Ok(seqs)
    }

    fn events_since(
        &self,
        since_ms: i64,
        fleet: Option<&str>,
        limit: usize,
    ) -> Result<Vec<EventRow>, StoreError> {
        let op = match fleet {
            Some(fleet) => format!("read the events of fleet {fleet}"),
            None => "read the events".to_owned(),
        };
        self.newest_events(
            &op,
            "WHERE at_ms >= ?1 AND (?2 IS NULL OR fleet = ?2) ORDER BY seq DESC LIMIT ?3",
            rusqlite::params![since_ms, fleet, sql_limit(limit)],
        )
    }

    fn minion_events(&self, minion: &str, limit: usize) -> Result<Vec<EventRow>, StoreError> {
        self.newest_events(
            &format!("read the events of minion {minion}"),
            "WHERE minion = ?1 ORDER BY seq DESC LIMIT ?2",
            rusqlite::params![minion, sql_limit(limit)],
        )
    }

    fn prune_events(&self, before_ms: i64) -> Result<u64, StoreError> {
        let deleted = self
            .conn()
            .execute("DELETE FROM events WHERE at_ms < ?1", [before_ms])
            .map_err(self.sql_err("prune events"))?;
        // usize always fits in u64 on the platforms Rust supports.
        Ok(u64::try_from(deleted).unwrap_or(u64::MAX))
    }

    fn claim_identity_join(
        &self,
        instance: &str,
        fleet: &str,
        at_ms: i64,
    ) -> Result<Option<i64>, StoreError> {
        // One statement: of two Joins with the same document at once,
        // exactly one gets in.
        let conn = self.conn();
        let inserted = conn
            .execute(
                "INSERT INTO identity_joins (instance, fleet, joined_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (instance) DO NOTHING",
                rusqlite::params![instance, fleet, at_ms],
            )
            .map_err(self.sql_err(format!("record the identity join of {instance}")))?;
        if inserted == 1 {
            return Ok(None);
        }
        conn.query_row(
            "SELECT joined_ms FROM identity_joins WHERE instance = ?1",
            [instance],
            |row| row.get(0),
        )
        .map(Some)
        .map_err(self.sql_err(format!("read the identity join of {instance}")))
    }

    fn forget_identity_join(&self, instance: &str) -> Result<Option<String>, StoreError> {
        use rusqlite::OptionalExtension;
        self.conn()
            .query_row(
                "DELETE FROM identity_joins WHERE instance = ?1 RETURNING fleet",
                [instance],
                |row| row.get(0),
            )
            .optional()
            .map_err(self.sql_err(format!("forget the identity join of {instance}")))
    }
}

/// A row count as SQLite's LIMIT takes it. More than i64::MAX rows cannot
/// exist, so clamping changes nothing.
fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

fn create_dir(dir: &Path) -> Result<(), StoreError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|source| StoreError::Io {
        path: dir.to_owned(),
        op: "create the store directory",
        source,
    })
}

/// `path` with `suffix` appended to its file name: SQLite's side files.
fn side_file(path: &Path, suffix: &str) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(suffix);
    PathBuf::from(name)
}

/// The length of a file, None when it does not exist.
fn file_len(path: &Path) -> Result<Option<u64>, StoreError> {
    match fs::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(Some(meta.len())),
        Ok(_) => Err(corrupt(path, "is not a regular file")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StoreError::Io {
            path: path.to_owned(),
            op: "examine",
            source,
        }),
    }
}

fn corrupt(path: &Path, detail: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        path: path.to_owned(),
        detail: detail.into(),
        source: None,
    }
}

/// Decides, without writing anything, whether the file at `path` may be
/// opened read-write: it is missing or empty (a new store), or it is a
/// sound gru store at a schema version this build can migrate from.
///
/// Why read the header by hand first: the damage we expect (not a database
/// at all, a file cut short) is then named plainly, and no SQLite heuristic
/// about short or odd files stands between such a file and a migration that
/// would write over it; SQLite's own checks follow as a second line.
///
/// Why `immutable=1` when there is no write-ahead log: a plain read-only
/// connection to a WAL-mode file creates `-wal` and `-shm` files beside it,
/// and a refused file should have nothing new next to it either.
fn inspect(path: &Path) -> Result<(), StoreError> {
    let wal = side_file(path, "-wal");
    let wal_len = file_len(&wal)?.unwrap_or(0);
    let len = file_len(path)?.unwrap_or(0);
    if len == 0 {
        if wal_len > 0 {
            // SQLite would replay this log into a new, empty database: the
            // result would be part of some other store.
            return Err(corrupt(
                path,
                format!(
                    "the database is missing or empty but its log {} holds {wal_len} bytes",
                    wal.display()
                ),
            ));
        }
        return Ok(());
    }
    check_header(path, len, wal_len > 0)?;

    let conn = open_read_only(path, wal_len > 0)?;
    let classify = |source: rusqlite::Error| match source.sqlite_error_code() {
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => StoreError::Corrupt {
            path: path.to_owned(),
            detail: "SQLite cannot read it".to_owned(),
            source: Some(source),
        },
        _ => StoreError::Open {
            path: path.to_owned(),
            source,
        },
    };

    let version = schema_version(path, user_version(&conn).map_err(classify)?)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Newer {
            path: path.to_owned(),
            found: version,
            supported: SCHEMA_VERSION,
        });
    }

    let problems = quick_check(&conn).map_err(classify)?;
    if !problems.is_empty() {
        return Err(corrupt(
            path,
            format!("integrity check failed: {}", problems.join("; ")),
        ));
    }

    let tables = tables(&conn).map_err(classify)?;
    if version == 0 {
        // Our migrations set the version in the same transaction as they
        // create tables, so a version-0 file with tables is somebody else's.
        if !tables.is_empty() {
            return Err(corrupt(
                path,
                format!(
                    "not a gru store (schema version 0 but it holds tables {})",
                    tables.join(", ")
                ),
            ));
        }
    } else if version == SCHEMA_VERSION {
        for (table, columns) in EXPECTED_SCHEMA {
            if !tables.iter().any(|t| t == table) {
                return Err(corrupt(
                    path,
                    format!("schema version {version} but table {table} is missing"),
                ));
            }
            let present = table_columns(&conn, table).map_err(classify)?;
            for column in *columns {
                if !present.iter().any(|c| c == column) {
                    return Err(corrupt(
                        path,
                        format!(
                            "schema version {version} but table {table} has no column {column}"
                        ),
                    ));
                }
            }
        }
    }
    // Versions between 0 and SCHEMA_VERSION (none yet) are checked by their
    // migrations, which fail and roll back on a table that is not there.
    Ok(())
}

/// Checks the 100-byte header of a non-empty file: the SQLite magic, a
/// valid page size, whole pages, and (when no log holds newer pages) at
/// least as many pages as the header says.
fn check_header(path: &Path, len: u64, has_log: bool) -> Result<(), StoreError> {
    let read_err = |source| StoreError::Io {
        path: path.to_owned(),
        op: "read the header of",
        source,
    };
    if len < HEADER_LEN as u64 {
        return Err(corrupt(
            path,
            format!("not a SQLite database (only {len} bytes)"),
        ));
    }
    let mut header = [0u8; HEADER_LEN];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut header))
        .map_err(read_err)?;
    if &header[..16] != SQLITE_MAGIC {
        return Err(corrupt(path, "not a SQLite database (no SQLite header)"));
    }
    let be32 = |at: usize| {
        u32::from_be_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    let page_size = match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65536,
        n if n >= 512 && n.is_power_of_two() => u64::from(n),
        n => {
            return Err(corrupt(
                path,
                format!("damaged SQLite header (page size {n})"),
            ));
        }
    };
    if !len.is_multiple_of(page_size) {
        return Err(corrupt(
            path,
            format!(
                "truncated or damaged: {len} bytes is not a whole number of {page_size}-byte pages"
            ),
        ));
    }
    // The header's page count is valid when the change counter matches
    // "version valid for" (SQLite's own rule). With a log present, a crash
    // mid-checkpoint can legitimately leave the count ahead of the file;
    // the integrity check covers that case.
    let pages = u64::from(be32(28));
    if !has_log && pages != 0 && be32(24) == be32(92) && len < pages * page_size {
        return Err(corrupt(
            path,
            format!(
                "truncated: the header says {pages} pages of {page_size} bytes but the file has {len} bytes"
            ),
        ));
    }
    Ok(())
}

/// A read-only connection for [`inspect`]. With a log present the file must
/// be read through it (the log holds committed transactions), which may
/// create a `-shm` beside it; without one, `immutable=1` reads the file
/// alone, takes no locks and creates nothing.
fn open_read_only(path: &Path, has_log: bool) -> Result<Connection, StoreError> {
    let open_err = |source| StoreError::Open {
        path: path.to_owned(),
        source,
    };
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = if has_log {
        Connection::open_with_flags(path, flags)
    } else {
        Connection::open_with_flags(
            format!("{}?immutable=1", file_uri(path)),
            flags | OpenFlags::SQLITE_OPEN_URI,
        )
    }
    .map_err(open_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
    Ok(conn)
}

/// A `file:` URI naming `path`, every byte outside the unreserved set
/// percent-encoded so `?`, `#` and `%` in the path stay part of it.
fn file_uri(path: &Path) -> String {
    #[cfg(unix)]
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()).to_vec();
    // Best effort elsewhere: gru runs on Linux.
    #[cfg(not(unix))]
    let bytes = {
        let mut p = path.to_string_lossy().replace('\\', "/");
        if p.as_bytes().get(1) == Some(&b':') {
            // A drive letter: file:///C:/...
            p.insert(0, '/');
        }
        p.into_bytes()
    };
    // An absolute path gets an empty authority, so one starting with "//"
    // is not read as a host name.
    let mut uri = String::from(if bytes.first() == Some(&b'/') {
        "file://"
    } else {
        "file:"
    });
    for b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~/:".contains(&b) {
            uri.push(char::from(b));
        } else {
            uri.push_str(&format!("%{b:02X}"));
        }
    }
    uri
}

fn user_version(conn: &Connection) -> Result<i64, rusqlite::Error> {
    conn.query_row("PRAGMA user_version", [], |row| row.get(0))
}

/// The schema version as stored (SQLite keeps a signed 32-bit value).
fn schema_version(path: &Path, stored: i64) -> Result<u32, StoreError> {
    u32::try_from(stored).map_err(|_| corrupt(path, format!("bad schema version {stored}")))
}

/// The first lines of `PRAGMA quick_check`, empty when it reports "ok".
fn quick_check(conn: &Connection) -> Result<Vec<String>, rusqlite::Error> {
    let mut stmt = conn.prepare("PRAGMA quick_check")?;
    let lines = stmt
        .query_map([], |row| row.get::<_, String>(0))?
        .take(QUICK_CHECK_LINES)
        .collect::<Result<Vec<_>, _>>()?;
    if lines.len() == 1 && lines[0] == "ok" {
        return Ok(Vec::new());
    }
    Ok(lines)
}

fn tables(conn: &Connection) -> Result<Vec<String>, rusqlite::Error> {
    let mut stmt = conn.prepare(
        "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'
         ORDER BY name",
    )?;
    stmt.query_map([], |row| row.get(0))?.collect()
}

fn table_columns(conn: &Connection, table: &str) -> Result<Vec<String>, rusqlite::Error> {
    let mut stmt = conn.prepare("SELECT name FROM pragma_table_info(?1)")?;
    stmt.query_map([table], |row| row.get(0))?.collect()
}

/// Per-connection settings, applied before anything is written.
fn configure(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let sql_err = |op: &str| {
        let op = op.to_owned();
        move |source| StoreError::Sqlite {
            path: path.to_owned(),
            op,
            source,
        }
    };
    // First, so the settings below wait for another connection's lock
    // instead of failing at once.
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(sql_err("set the busy timeout"))?;
    // WAL: a commit appends to the log instead of rewriting pages in place,
    // so a crash mid-write never damages committed data, and readers (a
    // second `gru` process inspecting the file) do not block the writer.
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
        .map_err(sql_err("switch to WAL"))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(corrupt(
            path,
            format!("cannot use a write-ahead log (journal mode stays {mode})"),
        ));
    }
    // FULL: fsync the log on every commit. NORMAL in WAL mode may lose the
    // last commits on power loss, and a decrement claim written before a
    // cloud call must survive that too. State changes are rare, so the cost
    // does not matter.
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(sql_err("set synchronous"))?;
    // Off by default in SQLite, per connection; on so any reference a later
    // schema adds is enforced rather than decorative.
    conn.pragma_update(None, "foreign_keys", true)
        .map_err(sql_err("enable foreign keys"))?;
    Ok(())
}

/// Brings the file to [`SCHEMA_VERSION`], one transaction per step. Each
/// step reads the version again inside its write transaction, so two
/// processes opening a new store at once migrate it once.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    for (to, sql) in (1u32..).zip(MIGRATIONS) {
        let op = || format!("migrate to schema version {to}");
        let sql_err = |source| StoreError::Sqlite {
            path: path.to_owned(),
            op: op(),
            source,
        };
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql_err)?;
        let current = schema_version(path, user_version(&tx).map_err(sql_err)?)?;
        if current >= to {
            continue;
        }
        tx.execute_batch(sql).map_err(sql_err)?;
        tx.pragma_update(None, "user_version", to)
            .map_err(sql_err)?;
        tx.commit().map_err(sql_err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance;
    use crate::store::examples::{event, full_minion, minion};
    use std::sync::Arc;

    fn db(dir: &tempfile::TempDir) -> PathBuf {
        dir.path().join(DB_FILE)
    }

    /// Names of everything in `dir`, sorted.
    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// A closed store with some rows in every table, spread over several
    /// pages so truncation and damage have something to hit.
    fn populated(dir: &tempfile::TempDir) -> PathBuf {
        let store = SqliteStore::open(dir.path()).unwrap();
        for i in 0..50 {
            store.put_minion(&full_minion(&format!("m-{i}"))).unwrap();
        }
        let events: Vec<EventRow> = (0..200).map(|i| event(i, "web", Some("m-1"))).collect();
        store.append_events(&events).unwrap();
        store.claim_decrement("i-1", "m-1", "web", 5).unwrap();
        drop(store);
        db(dir)
    }

    /// Opening must fail, the message must name the file, and the directory
    /// must hold exactly what it held before, byte for byte.
    fn assert_refused(dir: &tempfile::TempDir) -> StoreError {
        let path = db(dir);
        let before = fs::read(&path).unwrap();
        let listed = listing(dir.path());
        let err = SqliteStore::open(dir.path()).unwrap_err();
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err} does not name {}",
            path.display()
        );
        assert!(
            fs::read(&path).unwrap() == before,
            "{} was changed",
            path.display()
        );
        assert_eq!(listing(dir.path()), listed, "side files were created");
        err
    }

    #[test]
    fn new_store_in_missing_dir_is_migrated() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        let store = SqliteStore::open(&dir).unwrap();
        assert_eq!(store.path(), dir.join(DB_FILE));
        assert_eq!(store.load().unwrap(), Loaded::default());
        drop(store);

        let raw = Connection::open(dir.join(DB_FILE)).unwrap();
        let version: u32 = raw
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let mode: String = raw
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        assert_eq!(
            tables(&raw).unwrap(),
            [
                "events",
                "fleet_history",
                "fleets",
                "identity_joins",
                "ledger",
                "minions"
            ]
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&dir).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700);
        }
    }

    #[test]
    fn a_minion_and_its_events_land_together() {
        let dir = tempfile::tempdir().unwrap();
        conformance::a_minion_and_its_events_land_together(&SqliteStore::open(dir.path()).unwrap());
    }

    #[test]
    fn empty_file_is_a_new_store() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(db(&dir), b"").unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        store.put_minion(&minion("m-1")).unwrap();
        drop(store);
        let store = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(store.load().unwrap().minions, [minion("m-1")]);
    }

    #[test]
    fn every_row_type_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let fleets = vec![
            FleetRow {
                name: "batch".to_owned(),
                paused: None,
                pin: Some(PinRow {
                    desired: u32::MAX,
                    until_ms: None,
                    origin: Origin {
                        by: "gru dev".to_owned(),
                        at_ms: 7,
                    },
                }),
                policy_memory: String::new(),
            },
            FleetRow {
                name: "web".to_owned(),
                paused: Some(Origin {
                    by: "admin CN=alice".to_owned(),
                    at_ms: 42,
                }),
                pin: Some(PinRow {
                    desired: 3,
                    until_ms: Some(99),
                    origin: Origin {
                        by: "unknown".to_owned(),
                        at_ms: 43,
                    },
                }),
                policy_memory: "{\"ewma\":1.5}".to_owned(),
            },
        ];
        let minions = vec![full_minion("m-a"), minion("m-b")];
        let transition = EventRow {
            minion: Some("m-a".to_owned()),
            kind: "transition".to_owned(),
            from: Some("InService".to_owned()),
            to: Some("Draining:Flushing".to_owned()),
            actor: Some("admin CN=alice".to_owned()),
            ..event(10, "web", None)
        };
        let plain = event(11, "batch", None);
        {
            let store = SqliteStore::open(dir.path()).unwrap();
            for m in &minions {
                store.put_minion(m).unwrap();
            }
            for f in &fleets {
                store.put_fleet(f).unwrap();
            }
            assert!(store.claim_decrement("i-a", "m-a", "web", 100).unwrap());
            assert!(store.claim_decrement("i-b", "m-b", "web", 101).unwrap());
            store.confirm_decrement("i-b", 102).unwrap();
            assert_eq!(
                store
                    .append_events(&[transition.clone(), plain.clone()])
                    .unwrap(),
                [1, 2]
            );
        }

        let store = SqliteStore::open(dir.path()).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.minions, minions);
        assert_eq!(loaded.fleets, fleets);
        assert_eq!(
            loaded.ledger,
            [
                LedgerRow {
                    instance: "i-a".to_owned(),
                    minion: "m-a".to_owned(),
                    fleet: "web".to_owned(),
                    asked_ms: 100,
                    confirmed_ms: None,
                },
                LedgerRow {
                    instance: "i-b".to_owned(),
                    minion: "m-b".to_owned(),
                    fleet: "web".to_owned(),
                    asked_ms: 101,
                    confirmed_ms: Some(102),
                },
            ]
        );
        assert_eq!(
            store.events_since(i64::MIN, None, 10).unwrap(),
            [
                EventRow {
                    seq: 1,
                    ..transition
                },
                EventRow { seq: 2, ..plain },
            ]
        );
    }

    #[test]
    fn writes_survive_a_kill_without_close() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        store.put_minion(&full_minion("m-1")).unwrap();
        assert!(store.claim_decrement("i-1", "m-1", "web", 1).unwrap());
        // No close, no checkpoint: the log is left behind as after SIGKILL.
        std::mem::forget(store);
        assert!(fs::metadata(side_file(&db(&dir), "-wal")).unwrap().len() > 0);

        let store = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(store.load().unwrap().minions, [full_minion("m-1")]);
        assert!(!store.claim_decrement("i-1", "m-1", "web", 2).unwrap());
    }

    #[test]
    fn put_replaces_and_delete_forgets() {
        let dir = tempfile::tempdir().unwrap();
        conformance::put_replaces_and_delete_forgets(&SqliteStore::open(dir.path()).unwrap());
    }

    #[test]
    fn a_hand_edited_row_is_a_decode_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        store.put_minion(&minion("m-1")).unwrap();
        let raw = Connection::open(db(&dir)).unwrap();
        raw.execute_batch(
            "PRAGMA ignore_check_constraints = ON;
             UPDATE minions SET registered = 2 WHERE id = 'm-1'",
        )
        .unwrap();
        drop(raw);
        let err = store.load().unwrap_err();
        assert!(matches!(err, StoreError::Decode { .. }), "{err}");
        let message = err.to_string();
        assert!(
            message.contains(&db(&dir).display().to_string()),
            "{message}"
        );
        assert!(message.contains("minion m-1"), "{message}");
        assert!(message.contains("registered is 2"), "{message}");
    }

    #[test]
    fn decrement_claims() {
        let dir = tempfile::tempdir().unwrap();
        conformance::decrement_claims(SqliteStore::open(dir.path()).unwrap(), || {
            SqliteStore::open(dir.path()).unwrap()
        });
    }

    #[test]
    fn an_identity_join_is_once_until_forgotten_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        conformance::an_identity_join_is_once_until_forgotten(
            SqliteStore::open(dir.path()).unwrap(),
            || SqliteStore::open(dir.path()).unwrap(),
        );
    }

    #[test]
    fn a_version_1_store_is_migrated_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        assert!(store.claim_decrement("i-1", "m-1", "web", 5).unwrap());
        let path = store.location();
        drop(store);
        // Back to what a version-1 build wrote: no identity_joins table
        // (nor the fleet_history of version 3).
        let raw = Connection::open(&path).unwrap();
        raw.execute_batch(
            "DROP TABLE identity_joins; DROP TABLE fleet_history; PRAGMA user_version = 1;",
        )
        .unwrap();
        drop(raw);
        let store = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(store.load().unwrap().ledger.len(), 1);
        assert_eq!(store.claim_identity_join("i-1", "web", 6).unwrap(), None);
    }

    #[test]
    fn one_claim_wins_across_connections() {
        let dir = tempfile::tempdir().unwrap();
        // Two stores on one file stand for two processes.
        let stores = [
            Arc::new(SqliteStore::open(dir.path()).unwrap()),
            Arc::new(SqliteStore::open(dir.path()).unwrap()),
        ];
        for round in 0..20 {
            let instance = format!("i-{round}");
            let handles: Vec<_> = (0..4)
                .map(|t| {
                    let store = Arc::clone(&stores[t % 2]);
                    let instance = instance.clone();
                    std::thread::spawn(move || {
                        store.claim_decrement(&instance, "m", "web", 0).unwrap()
                    })
                })
                .collect();
            let won = handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .filter(|&won| won)
                .count();
            assert_eq!(won, 1, "round {round}");
        }
    }

    #[test]
    fn events_since_filters_orders_and_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        conformance::events_since_filters_orders_and_keeps_the_newest(
            &SqliteStore::open(dir.path()).unwrap(),
        );
    }

    #[test]
    fn minion_events_are_that_minions_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        conformance::minion_events_are_that_minions_oldest_first(
            &SqliteStore::open(dir.path()).unwrap(),
        );
    }

    #[test]
    fn prune_deletes_older_and_never_reuses_seqs() {
        let dir = tempfile::tempdir().unwrap();
        conformance::prune_deletes_older_and_never_reuses_seqs(
            SqliteStore::open(dir.path()).unwrap(),
            || SqliteStore::open(dir.path()).unwrap(),
        );
    }

    #[test]
    fn refuses_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let garbage: Vec<u8> = (0..8192u32).map(|i| (i * 31 % 251) as u8).collect();
        fs::write(db(&dir), &garbage).unwrap();
        let err = assert_refused(&dir);
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("not a SQLite database"), "{err}");

        fs::write(db(&dir), b"short").unwrap();
        assert!(matches!(assert_refused(&dir), StoreError::Corrupt { .. }));
    }

    #[test]
    fn refuses_a_truncated_database() {
        for keep in [1000, HEADER_LEN as u64, 0] {
            let dir = tempfile::tempdir().unwrap();
            let path = populated(&dir);
            let len = fs::metadata(&path).unwrap().len();
            // 0 stands for "half, rounded to whole pages", which only the
            // header's page count gives away.
            let keep = if keep == 0 {
                len / 2 / 4096 * 4096
            } else {
                keep
            };
            assert!(keep < len && keep > 0, "{keep} of {len}");
            File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(keep)
                .unwrap();
            let err = assert_refused(&dir);
            assert!(matches!(err, StoreError::Corrupt { .. }), "{keep}: {err}");
            assert!(err.to_string().contains("truncated"), "{keep}: {err}");
        }
    }

    #[test]
    fn refuses_a_damaged_page() {
        let dir = tempfile::tempdir().unwrap();
        let path = populated(&dir);
        let mut bytes = fs::read(&path).unwrap();
        assert!(bytes.len() >= 4 * 4096);
        // Page 3 is a b-tree page of one of the tables.
        for b in &mut bytes[2 * 4096..3 * 4096] {
            *b = 0xA5;
        }
        fs::write(&path, &bytes).unwrap();
        let err = assert_refused(&dir);
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = populated(&dir);
        let raw = Connection::open(&path).unwrap();
        raw.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        drop(raw);
        let err = assert_refused(&dir);
        assert!(
            matches!(err, StoreError::Newer { found, supported, .. }
                if found == SCHEMA_VERSION + 1 && supported == SCHEMA_VERSION),
            "{err}"
        );
        assert!(err.to_string().contains("written by a newer gru"), "{err}");
    }

    #[test]
    fn refuses_missing_tables_and_columns() {
        let dir = tempfile::tempdir().unwrap();
        let path = populated(&dir);
        let raw = Connection::open(&path).unwrap();
        raw.execute_batch("DROP TABLE ledger").unwrap();
        drop(raw);
        let err = assert_refused(&dir);
        assert!(err.to_string().contains("table ledger is missing"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let path = populated(&dir);
        let raw = Connection::open(&path).unwrap();
        raw.execute_batch("ALTER TABLE events DROP COLUMN actor")
            .unwrap();
        drop(raw);
        let err = assert_refused(&dir);
        assert!(err.to_string().contains("no column actor"), "{err}");
    }

    #[test]
    fn refuses_a_foreign_database() {
        let dir = tempfile::tempdir().unwrap();
        let raw = Connection::open(db(&dir)).unwrap();
        raw.execute_batch("CREATE TABLE recipes (name TEXT)")
            .unwrap();
        drop(raw);
        let err = assert_refused(&dir);
        assert!(err.to_string().contains("not a gru store"), "{err}");
    }

    #[test]
    fn refuses_a_log_without_its_database() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        store.put_minion(&minion("m-1")).unwrap();
        std::mem::forget(store);
        fs::remove_file(db(&dir)).unwrap();
        let wal = side_file(&db(&dir), "-wal");
        let before = fs::read(&wal).unwrap();
        let err = SqliteStore::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains(&db(&dir).display().to_string()));
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert!(!db(&dir).exists());
        assert!(fs::read(&wal).unwrap() == before);
    }

    #[test]
    fn file_uri_escapes_the_path() {
        assert_eq!(
            file_uri(Path::new("/a b/c?d#e%f/x.db")),
            "file:///a%20b/c%3Fd%23e%25f/x.db"
        );
        assert_eq!(file_uri(Path::new("//h/x.db")), "file:////h/x.db");
        assert_eq!(file_uri(Path::new("rel/x.db")), "file:rel/x.db");
    }

    #[test]
    fn a_store_in_an_awkward_path_opens() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("we?ird #dir%");
        let store = SqliteStore::open(&dir).unwrap();
        store.put_minion(&minion("m-1")).unwrap();
        drop(store);
        // The second open goes through the immutable read-only inspection.
        let store = SqliteStore::open(&dir).unwrap();
        assert_eq!(store.load().unwrap().minions, [minion("m-1")]);
    }
}
