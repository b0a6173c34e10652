//! [`DynamoStore`]: the controller's `Store` on a DynamoDB table, with the
//! same semantics as the SQLite store (gru-controller's `store::sqlite`),
//! method for method.
//!
//! Start reading at [`Inner::transact`]: every write goes through it, as one
//! TransactWriteItems whose first item is the [`Fence`]'s ConditionCheck of
//! the lease. A controller that does not lead is refused before any I/O; one
//! that was deposed finds its transaction cancelled by that check, and gets
//! [`StoreError::Fenced`].
//!
//! Items (the table layout is in the parent module): each row is the row
//! type's JSON in a `row` string attribute, beside the plain attributes that
//! conditions and filters need (`confirmed_ms` on a ledger item; `at_ms`,
//! `fleet`, `minion` on an event). The `meta`/`event-seq` item holds the
//! last event sequence number handed out; it is never deleted, so a number
//! is never reused, even after a prune. Events are keyed by their sequence
//! number, zero-padded to 20 digits so the sort key orders them.
//!
//! Sync over async: the `Store` trait is synchronous and is called from
//! inside tokio tasks (of current-thread and multi-thread runtimes alike).
//! The store owns a small runtime of its own and a client whose HTTP
//! connections belong to that runtime; each method spawns its work there and
//! waits for the answer on a std channel. `Runtime::block_on` would panic
//! inside the caller's runtime, and the caller's runtime may be blocked by
//! this very wait, so nothing of the store's may run on it.
//!
//! Invariants:
//! - Every write is fenced (see above); reads are strongly consistent.
//! - Every SDK call is bounded by [`CALL_TIMEOUT`].
//! - Read-then-write steps (the next event seq, confirming a claim,
//!   forgetting a join) condition the write on what was read and retry when
//!   it changed, so they are exact even against a second writer.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, mpsc};
use std::time::Duration;

use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::builders::{DeleteBuilder, PutBuilder};
use aws_sdk_dynamodb::types::{
    AttributeValue, CancellationReason, Delete, KeyType, Put, ReturnValuesOnConditionCheckFailure,
    ScalarAttributeType, TableDescription, TransactWriteItem,
};
use gru_controller::store::{
    EventRow, FleetRow, HistoryRow, LedgerRow, Loaded, MinionRow, SCHEMA_VERSION, Store, StoreError,
};
use tokio::runtime::{Handle, Runtime};

use super::{Fence, PK, SK};

/// Bound on every SDK call: an answer later than this is treated as none.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The most items one TransactWriteItems may hold (DynamoDB's limit and
/// moto's). One of them is always the fence's ConditionCheck.
const MAX_TRANSACT_ITEMS: usize = 100;

/// How often a read-then-write step is tried when what it read changed
/// before its write, and how often a transaction cancelled by a conflict
/// with another transaction is sent again.
const ATTEMPTS: u32 = 5;

/// What the table says to do when it is missing or wrong.
const CREATE_HINT: &str = "create it with the CloudFormation stack's StateTable";

// Partition keys (the kinds of item) and the fixed sort keys.
const MINION: &str = "minion";
const FLEET: &str = "fleet";
const HISTORY: &str = "history";
const LEDGER: &str = "ledger";
const IDENTITY: &str = "identity";
const EVENT: &str = "event";
const INTENT: &str = "intent";
const META: &str = "meta";
const SCHEMA_SK: &str = "schema";
const EVENT_SEQ_SK: &str = "event-seq";

// Attributes beside the keys.
/// The row's JSON.
const ROW: &str = "row";
/// On a ledger item once confirmed (N): what a release is conditioned on.
const CONFIRMED_MS: &str = "confirmed_ms";
/// On an event (N, S, S): what the event queries filter on.
const AT_MS: &str = "at_ms";
const EVENT_FLEET: &str = "fleet";
const EVENT_MINION: &str = "minion";
/// On `meta`/`event-seq` (N): the last sequence number handed out.
const SEQ: &str = "seq";
/// On `meta`/`schema` (N).
const SCHEMA_VERSION_ATTR: &str = "version";

/// What a failed cancellation reason's code says.
const CONDITION_FAILED: &str = "ConditionalCheckFailed";
const CONFLICT: &str = "TransactionConflict";

type Item = HashMap<String, AttributeValue>;

/// A row as JSON. The row types hold only strings, integers, booleans and
/// options of them, which always serialize. A macro because serde (whose
/// `Serialize` a generic function would name) is not a dependency here.
macro_rules! encode {
    ($row:expr) => {
        serde_json::to_string($row).expect("a row of plain values serializes")
    };
}

/// The controller's store on a DynamoDB table, shared by every controller
/// of one deployment; only the one holding the lease (its [`Fence`]) can
/// write.
///
/// Differences from the SQLite store, all forced by DynamoDB's 100-item
/// transactions: an append of more events than one transaction holds (98,
/// or 97 beside a minion row) is split into several fenced transactions, so
/// it is not atomic as a whole (each part is, and the minion row lands with
/// the first); a prune deletes in such batches too.
pub struct DynamoStore {
    inner: Arc<Inner>,
    /// Where every SDK future runs.
    handle: Handle,
    /// Owned so it lives as long as the store; shut down in the background
    /// on drop (dropping a runtime inside async context panics).
    runtime: Option<Runtime>,
}

/// What the work spawned on the store's runtime needs.
struct Inner {
    /// Its HTTP client is the store runtime's own.
    client: aws_sdk_dynamodb::Client,
    table: String,
    fence: Fence,
    /// `dynamodb:<table>`, for messages.
    location: PathBuf,
    /// Serializes this process's event appends, so they do not race each
    /// other for the next sequence number (fencing keeps other processes
    /// out; the seq condition catches anything else).
    append: tokio::sync::Mutex<()>,
}

impl fmt::Debug for DynamoStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DynamoStore")
            .field("table", &self.inner.table)
            .field("fence", &self.inner.fence.version())
            .finish_non_exhaustive()
    }
}

impl DynamoStore {
    /// Opens the store on `table`: checks the table exists with the `pk`/`sk`
    /// string key schema, and that its schema version (if it has one yet) is
    /// not newer than this build's. Writes nothing.
    ///
    /// The store talks to DynamoDB with `client`'s configuration but its own
    /// HTTP client, on its own runtime, so it works from any runtime.
    pub async fn open(
        client: aws_sdk_dynamodb::Client,
        table: &str,
        fence: Fence,
    ) -> Result<DynamoStore, StoreError> {
        let location = PathBuf::from(format!("dynamodb:{table}"));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("gru-dynamodb")
            .enable_all()
            .build()
            .map_err(|source| StoreError::Io {
                path: location.clone(),
                op: "start the runtime of",
                source,
            })?;
        let client = aws_sdk_dynamodb::Client::from_conf(
            client
                .config()
                .to_builder()
                .http_client(crate::config::https_client())
                .build(),
        );
        // Built before the first call so that an error drops it, and with
        // it the runtime, through `Drop`.
        let store = DynamoStore {
            inner: Arc::new(Inner {
                client,
                table: table.to_owned(),
                fence,
                location,
                append: tokio::sync::Mutex::new(()),
            }),
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
        };
        store
            .run_async("open the table".to_owned(), |s, op| async move {
                s.check_table(&op).await
            })
            .await?;
        Ok(store)
    }

    /// Records, under the lease, what cloud call this controller is about to
    /// make for `fleet` (the `intent`/fleet item): a fenced write, so a
    /// deposed leader learns it was deposed before making the call.
    pub async fn record_intent(
        &self,
        fleet: &str,
        what: &str,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        let fleet = fleet.to_owned();
        let what = what.to_owned();
        self.run_async(
            format!("record the intent for fleet {fleet}"),
            |s, op| async move {
                let row = serde_json::json!({ "fleet": fleet, "what": what, "at_ms": at_ms });
                let mut item = key(INTENT, &fleet);
                item.insert(ROW.to_owned(), AttributeValue::S(row.to_string()));
                item.insert(AT_MS.to_owned(), number(at_ms));
                s.write(&op, vec![put(s.put(item))]).await
            },
        )
        .await
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.inner.table
    }

    /// Runs `work` on the store's runtime and waits, blocking this thread,
    /// for its answer.
    fn block<T, F, Fut>(&self, op: String, work: F) -> Result<T, StoreError>
    where
        F: FnOnce(Arc<Inner>, String) -> Fut,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = mpsc::channel();
        let work = work(Arc::clone(&self.inner), op.clone());
        self.handle.spawn(async move {
            let _ = tx.send(work.await);
        });
        rx.recv().unwrap_or_else(|_| Err(self.inner.lost(&op)))
    }

    /// Runs `work` on the store's runtime and awaits its answer.
    async fn run_async<T, F, Fut>(&self, op: String, work: F) -> Result<T, StoreError>
    where
        F: FnOnce(Arc<Inner>, String) -> Fut,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let work = work(Arc::clone(&self.inner), op.clone());
        self.handle.spawn(async move {
            let _ = tx.send(work.await);
        });
        rx.await.unwrap_or_else(|_| Err(self.inner.lost(&op)))
    }
}

impl Drop for DynamoStore {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Store for DynamoStore {
    fn location(&self) -> PathBuf {
        self.inner.location.clone()
    }

    fn kind(&self) -> &'static str {
        "dynamodb"
    }

    /// Also marks the table with this build's schema version when it has
    /// none or an older one (a fenced write, skipped while not leading: a
    /// standby writes nothing, and the leader's load marks it).
    fn load(&self) -> Result<Loaded, StoreError> {
        self.block("load".to_owned(), |s, _| async move { s.load().await })
    }

    fn put_minion(&self, m: &MinionRow) -> Result<(), StoreError> {
        let m = m.clone();
        self.block(format!("put minion {}", m.id), |s, op| async move {
            s.write(&op, vec![put(s.put(minion_item(&m)))]).await
        })
    }

    fn put_minion_with_events(&self, m: &MinionRow, events: &[EventRow]) -> Result<(), StoreError> {
        let m = m.clone();
        let events = events.to_vec();
        self.block(
            format!("put minion {} with its events", m.id),
            |s, op| async move {
                let row = put(s.put(minion_item(&m)));
                if events.is_empty() {
                    s.write(&op, vec![row]).await
                } else {
                    s.append(&op, Some(row), &events).await.map(drop)
                }
            },
        )
    }

    fn delete_minion(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.block(format!("delete minion {id}"), |s, op| async move {
            s.write(&op, vec![delete(s.delete(MINION, &id))]).await
        })
    }

    fn put_fleet(&self, f: &FleetRow) -> Result<(), StoreError> {
        let f = f.clone();
        self.block(format!("put fleet {}", f.name), |s, op| async move {
            let mut item = key(FLEET, &f.name);
            item.insert(ROW.to_owned(), AttributeValue::S(encode!(&f)));
            s.write(&op, vec![put(s.put(item))]).await
        })
    }

    fn put_fleet_history(&self, h: &HistoryRow) -> Result<(), StoreError> {
        let h = h.clone();
        self.block(
            format!("put the history of fleet {}", h.name),
            |s, op| async move {
                let mut item = key(HISTORY, &h.name);
                item.insert(ROW.to_owned(), AttributeValue::S(encode!(&h)));
                s.write(&op, vec![put(s.put(item))]).await
            },
        )
    }

    fn claim_decrement(
        &self,
        instance: &str,
        minion: &str,
        fleet: &str,
        at_ms: i64,
    ) -> Result<bool, StoreError> {
        let row = LedgerRow {
            instance: instance.to_owned(),
            minion: minion.to_owned(),
            fleet: fleet.to_owned(),
            asked_ms: at_ms,
            confirmed_ms: None,
        };
        self.block(
            format!("claim the decrement for instance {instance}"),
            |s, op| async move {
                let claim = s
                    .put(ledger_item(&row))
                    .condition_expression("attribute_not_exists(#pk)")
                    .expression_attribute_names("#pk", PK);
                match s.transact(&op, vec![put(claim)]).await? {
                    Ok(()) => Ok(true),
                    // An earlier claim stands (and was left as it was).
                    Err(c) if c.failed(0) => Ok(false),
                    Err(c) => Err(s.remote(&op, c.to_string())),
                }
            },
        )
    }

    fn release_decrement(&self, instance: &str) -> Result<(), StoreError> {
        let instance = instance.to_owned();
        self.block(
            format!("release the decrement for instance {instance}"),
            |s, op| async move {
                // A missing item passes the condition and is not there to
                // delete; a confirmed one fails it and stays.
                let release = s
                    .delete(LEDGER, &instance)
                    .condition_expression("attribute_not_exists(#c)")
                    .expression_attribute_names("#c", CONFIRMED_MS);
                match s.transact(&op, vec![delete(release)]).await? {
                    Ok(()) => Ok(()),
                    Err(c) if c.failed(0) => Ok(()),
                    Err(c) => Err(s.remote(&op, c.to_string())),
                }
            },
        )
    }

    fn confirm_decrement(&self, instance: &str, at_ms: i64) -> Result<(), StoreError> {
        let instance = instance.to_owned();
        self.block(
            format!("confirm the decrement for instance {instance}"),
            |s, op| async move { s.confirm(&op, &instance, at_ms).await },
        )
    }

    fn append_events(&self, events: &[EventRow]) -> Result<Vec<u64>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let events = events.to_vec();
        self.block(
            format!("append {} events", events.len()),
            |s, op| async move { s.append(&op, None, &events).await },
        )
    }

    fn events_since(
        &self,
        since_ms: i64,
        fleet: Option<&str>,
        limit: usize,
    ) -> Result<Vec<EventRow>, StoreError> {
        let fleet = fleet.map(str::to_owned);
        let op = match &fleet {
            Some(fleet) => format!("read the events of fleet {fleet}"),
            None => "read the events".to_owned(),
        };
        self.block(op, |s, op| async move {
            let mut filter = Filter {
                expression: "#at >= :since".to_owned(),
                names: vec![("#at", AT_MS)],
                values: vec![(":since", number(since_ms))],
            };
            if let Some(fleet) = fleet {
                filter.expression.push_str(" AND #fleet = :fleet");
                filter.names.push(("#fleet", EVENT_FLEET));
                filter.values.push((":fleet", AttributeValue::S(fleet)));
            }
            s.newest_events(&op, filter, limit).await
        })
    }

    fn minion_events(&self, minion: &str, limit: usize) -> Result<Vec<EventRow>, StoreError> {
        let minion = minion.to_owned();
        self.block(
            format!("read the events of minion {minion}"),
            |s, op| async move {
                let filter = Filter {
                    expression: "#minion = :minion".to_owned(),
                    names: vec![("#minion", EVENT_MINION)],
                    values: vec![(":minion", AttributeValue::S(minion))],
                };
                s.newest_events(&op, filter, limit).await
            },
        )
    }

    fn prune_events(&self, before_ms: i64) -> Result<u64, StoreError> {
        self.block("prune events".to_owned(), |s, op| async move {
            s.prune(&op, before_ms).await
        })
    }

    fn claim_identity_join(
        &self,
        instance: &str,
        fleet: &str,
        at_ms: i64,
    ) -> Result<Option<i64>, StoreError> {
        let instance = instance.to_owned();
        let fleet = fleet.to_owned();
        self.block(
            format!("record the identity join of {instance}"),
            |s, op| async move { s.claim_join(&op, &instance, &fleet, at_ms).await },
        )
    }

    fn forget_identity_join(&self, instance: &str) -> Result<Option<String>, StoreError> {
        let instance = instance.to_owned();
        self.block(
            format!("forget the identity join of {instance}"),
            |s, op| async move { s.forget_join(&op, &instance).await },
        )
    }
}

/// A transaction that did not land because a condition of the caller's own
/// items failed (not the fence's, which is [`StoreError::Fenced`]).
#[derive(Debug)]
struct Cancelled {
    /// One per item the caller gave, in order.
    reasons: Vec<CancellationReason>,
}

impl Cancelled {
    /// Whether the caller's item `i` failed its condition.
    fn failed(&self, i: usize) -> bool {
        self.reasons.get(i).and_then(|r| r.code()) == Some(CONDITION_FAILED)
    }

    /// What item `i` held when its condition failed (when asked for).
    fn old_item(&self, i: usize) -> Option<&Item> {
        self.reasons.get(i).and_then(|r| r.item())
    }
}

impl fmt::Display for Cancelled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "transaction cancelled: ")?;
        f.write_str(&reasons(&self.reasons))
    }
}

/// A query's FilterExpression with its placeholders.
struct Filter {
    expression: String,
    names: Vec<(&'static str, &'static str)>,
    values: Vec<(&'static str, AttributeValue)>,
}

impl Inner {
    fn remote(&self, op: &str, detail: impl Into<String>) -> StoreError {
        StoreError::Remote {
            path: self.location.clone(),
            op: op.to_owned(),
            detail: detail.into(),
        }
    }

    fn fenced(&self, op: &str, version: u64) -> StoreError {
        StoreError::Fenced {
            path: self.location.clone(),
            op: op.to_owned(),
            version,
        }
    }

    fn decode_err(&self, what: impl Into<String>, detail: impl Into<String>) -> StoreError {
        StoreError::Decode {
            path: self.location.clone(),
            what: what.into(),
            detail: detail.into(),
        }
    }

    /// The call's task ended without answering: the store was dropped while
    /// it ran, or it panicked.
    fn lost(&self, op: &str) -> StoreError {
        self.remote(op, "the store stopped before the call was answered")
    }

    fn timeout(&self, op: &str) -> StoreError {
        self.remote(op, format!("no answer within {}s", CALL_TIMEOUT.as_secs()))
    }

    /// Refuses, before any I/O, a write by a controller that does not lead.
    fn leading(&self, op: &str) -> Result<(), StoreError> {
        if self.fence.version() == 0 {
            return Err(self.fenced(op, 0));
        }
        Ok(())
    }

    /// One SDK call, bounded by [`CALL_TIMEOUT`], its error made a
    /// [`StoreError::Remote`].
    async fn call<T, E, R>(
        &self,
        op: &str,
        call: impl Future<Output = Result<T, SdkError<E, R>>>,
    ) -> Result<T, StoreError>
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: fmt::Debug,
    {
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => Err(self.remote(op, sdk_detail(&e))),
            Err(_) => Err(self.timeout(op)),
        }
    }

    /// One item, read consistently.
    async fn get(&self, op: &str, pk: &str, sk: &str) -> Result<Option<Item>, StoreError> {
        let read = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key(pk, sk)))
            .consistent_read(true)
            .send();
        Ok(self.call(op, read).await?.item)
    }

    /// A Put of `item` in the table; the caller adds any condition.
    fn put(&self, item: Item) -> PutBuilder {
        Put::builder().table_name(&self.table).set_item(Some(item))
    }

    /// A Delete of one item; the caller adds any condition.
    fn delete(&self, pk: &str, sk: &str) -> DeleteBuilder {
        Delete::builder()
            .table_name(&self.table)
            .set_key(Some(key(pk, sk)))
    }

    /// `items` in one fenced transaction, when the caller's items carry no
    /// condition that may fail.
    async fn write(&self, op: &str, items: Vec<TransactWriteItem>) -> Result<(), StoreError> {
        self.transact(op, items)
            .await?
            .map_err(|c| self.remote(op, c.to_string()))
    }

    /// `items` (at most [`MAX_TRANSACT_ITEMS`] - 1) in one TransactWriteItems
    /// after the fence's ConditionCheck. `Fenced` when this controller does
    /// not lead (no I/O) or no longer holds the lease term it leads
    /// under; `Ok(Err(_))` when a condition of `items` failed. A transaction
    /// cancelled by a conflict with another one in flight is sent again.
    async fn transact(
        &self,
        op: &str,
        items: Vec<TransactWriteItem>,
    ) -> Result<Result<(), Cancelled>, StoreError> {
        let version = self.fence.version();
        let Some(check) = self.fence.check(&self.table) else {
            return Err(self.fenced(op, version));
        };
        debug_assert!(items.len() < MAX_TRANSACT_ITEMS, "{op}: too many items");
        let mut all = Vec::with_capacity(items.len() + 1);
        all.push(check);
        all.extend(items);
        let mut attempt = 1;
        loop {
            let sent = self
                .client
                .transact_write_items()
                .set_transact_items(Some(all.clone()))
                .send();
            let err = match tokio::time::timeout(CALL_TIMEOUT, sent).await {
                Ok(Ok(_)) => return Ok(Ok(())),
                Ok(Err(e)) => e,
                Err(_) => return Err(self.timeout(op)),
            };
            let Some(TransactWriteItemsError::TransactionCanceledException(cancelled)) =
                err.as_service_error()
            else {
                return Err(self.remote(op, sdk_detail(&err)));
            };
            let reasons = cancelled.cancellation_reasons();
            if reasons.first().and_then(|r| r.code()) == Some(CONDITION_FAILED) {
                return Err(self.fenced(op, version));
            }
            let codes = || reasons.iter().filter_map(|r| r.code());
            if codes().any(|c| c == CONFLICT) && attempt < ATTEMPTS {
                tracing::debug!(op, attempt, "transaction conflict; sending it again");
                tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt))).await;
                attempt += 1;
                continue;
            }
            if reasons.len() == all.len()
                && codes().all(|c| c == "None" || c == CONDITION_FAILED)
                && codes().any(|c| c == CONDITION_FAILED)
            {
                return Ok(Err(Cancelled {
                    reasons: reasons[1..].to_vec(),
                }));
            }
            return Err(self.remote(
                op,
                format!("{}: {}", sdk_detail(&err), self::reasons(reasons)),
            ));
        }
    }

    /// Every item of kind `pk` (oldest first by sort key, or newest first)
    /// that passes `filter`, handed to `each` until it returns false.
    async fn query(
        &self,
        op: &str,
        pk: &str,
        filter: Option<&Filter>,
        newest_first: bool,
        mut each: impl FnMut(Item) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        let mut start = None;
        loop {
            let mut query = self
                .client
                .query()
                .table_name(&self.table)
                .consistent_read(true)
                .scan_index_forward(!newest_first)
                .key_condition_expression("#pk = :pk")
                .expression_attribute_names("#pk", PK)
                .expression_attribute_values(":pk", AttributeValue::S(pk.to_owned()))
                .set_exclusive_start_key(start.take());
            if let Some(filter) = filter {
                query = query.filter_expression(&filter.expression);
                for (placeholder, name) in &filter.names {
                    query = query.expression_attribute_names(*placeholder, *name);
                }
                for (placeholder, value) in &filter.values {
                    query = query.expression_attribute_values(*placeholder, value.clone());
                }
            }
            let page = self.call(op, query.send()).await?;
            for item in page.items.unwrap_or_default() {
                if !each(item)? {
                    return Ok(());
                }
            }
            match page.last_evaluated_key {
                Some(last) if !last.is_empty() => start = Some(last),
                _ => return Ok(()),
            }
        }
    }

    /// Checks the table's key schema and schema version (no write).
    async fn check_table(&self, op: &str) -> Result<(), StoreError> {
        let described = tokio::time::timeout(
            CALL_TIMEOUT,
            self.client.describe_table().table_name(&self.table).send(),
        )
        .await
        .map_err(|_| self.timeout(op))?;
        let table = match described {
            Ok(answer) => answer
                .table
                .unwrap_or_else(|| TableDescription::builder().build()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_resource_not_found_exception()) =>
            {
                return Err(self.remote(
                    op,
                    format!(
                        "table {} does not exist in this account and region; {CREATE_HINT}",
                        self.table
                    ),
                ));
            }
            Err(e) => return Err(self.remote(op, sdk_detail(&e))),
        };
        let string_key = |name: &str, kind: KeyType| {
            table
                .key_schema()
                .iter()
                .any(|k| k.attribute_name() == name && *k.key_type() == kind)
                && table.attribute_definitions().iter().any(|a| {
                    a.attribute_name() == name && *a.attribute_type() == ScalarAttributeType::S
                })
        };
        if table.key_schema().len() != 2
            || !string_key(PK, KeyType::Hash)
            || !string_key(SK, KeyType::Range)
        {
            let found: Vec<String> = table
                .key_schema()
                .iter()
                .map(|k| format!("{} ({})", k.attribute_name(), k.key_type().as_str()))
                .collect();
            return Err(StoreError::Corrupt {
                path: self.location.clone(),
                detail: format!(
                    "table {} has the key {}, not a string partition key {PK} and a string sort key {SK}; {CREATE_HINT}",
                    self.table,
                    found.join(" and ")
                ),
                source: None,
            });
        }
        match self.schema_version(op).await? {
            Some(found) if found > SCHEMA_VERSION => Err(self.newer(found)),
            _ => Ok(()),
        }
    }

    fn newer(&self, found: u32) -> StoreError {
        StoreError::Newer {
            path: self.location.clone(),
            found,
            supported: SCHEMA_VERSION,
        }
    }

    /// The table's schema version; None before a leader first loaded it.
    async fn schema_version(&self, op: &str) -> Result<Option<u32>, StoreError> {
        let Some(item) = self.get(op, META, SCHEMA_SK).await? else {
            return Ok(None);
        };
        Ok(Some(self.number(&item, SCHEMA_VERSION_ATTR, || {
            "the schema version".to_owned()
        })?))
    }

    /// Marks the table with [`SCHEMA_VERSION`] unless it has it (see
    /// `Store::load`); `Newer` when it is newer.
    async fn mark_schema(&self) -> Result<(), StoreError> {
        let op = "mark the schema version";
        for _ in 0..ATTEMPTS {
            let found = self.schema_version(op).await?;
            let condition = match found {
                Some(found) if found > SCHEMA_VERSION => return Err(self.newer(found)),
                Some(found) if found == SCHEMA_VERSION => return Ok(()),
                // Not leading: leave it to the leader.
                _ if self.fence.version() == 0 => return Ok(()),
                Some(found) => self
                    .put(schema_item(SCHEMA_VERSION))
                    .condition_expression("#v = :old")
                    .expression_attribute_names("#v", SCHEMA_VERSION_ATTR)
                    .expression_attribute_values(":old", number(found)),
                None => self
                    .put(schema_item(SCHEMA_VERSION))
                    .condition_expression("attribute_not_exists(#pk)")
                    .expression_attribute_names("#pk", PK),
            };
            match self.transact(op, vec![put(condition)]).await? {
                Ok(()) => return Ok(()),
                // Changed since it was read: look again.
                Err(c) if c.failed(0) => continue,
                Err(c) => return Err(self.remote(op, c.to_string())),
            }
        }
        Err(self.remote(
            op,
            format!("the schema version changed under each of {ATTEMPTS} attempts"),
        ))
    }

    async fn load(&self) -> Result<Loaded, StoreError> {
        self.mark_schema().await?;
        let mut loaded = Loaded::default();
        self.query("load minions", MINION, None, false, |item| {
            let row: MinionRow = self.decode(&item, MINION, |r| serde_json::from_str(r))?;
            self.same_key(&item, MINION, &row.id)?;
            loaded.minions.push(row);
            Ok(true)
        })
        .await?;
        self.query("load fleets", FLEET, None, false, |item| {
            let row: FleetRow = self.decode(&item, FLEET, |r| serde_json::from_str(r))?;
            self.same_key(&item, FLEET, &row.name)?;
            loaded.fleets.push(row);
            Ok(true)
        })
        .await?;
        self.query("load the ledger", LEDGER, None, false, |item| {
            let row: LedgerRow = self.decode(&item, LEDGER, |r| serde_json::from_str(r))?;
            self.same_key(&item, LEDGER, &row.instance)?;
            loaded.ledger.push(row);
            Ok(true)
        })
        .await?;
        self.query("load fleet histories", HISTORY, None, false, |item| {
            let row: HistoryRow = self.decode(&item, HISTORY, |r| serde_json::from_str(r))?;
            self.same_key(&item, HISTORY, &row.name)?;
            loaded.histories.push(row);
            Ok(true)
        })
        .await?;
        // The sort key already orders them so; sorting again states it.
        loaded.minions.sort_by(|a, b| a.id.cmp(&b.id));
        loaded.fleets.sort_by(|a, b| a.name.cmp(&b.name));
        loaded.ledger.sort_by(|a, b| a.instance.cmp(&b.instance));
        loaded.histories.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(loaded)
    }

    async fn confirm(&self, op: &str, instance: &str, at_ms: i64) -> Result<(), StoreError> {
        self.leading(op)?;
        for _ in 0..ATTEMPTS {
            let Some(item) = self.get(op, LEDGER, instance).await? else {
                return Err(StoreError::NoClaim {
                    path: self.location.clone(),
                    instance: instance.to_owned(),
                });
            };
            let row: LedgerRow = self.decode(&item, LEDGER, |r| serde_json::from_str(r))?;
            if row.confirmed_ms.is_some() {
                // Confirming twice keeps the first time.
                return Ok(());
            }
            let confirmed = LedgerRow {
                confirmed_ms: Some(at_ms),
                ..row
            };
            let write = self
                .put(ledger_item(&confirmed))
                .condition_expression("#row = :old")
                .expression_attribute_names("#row", ROW)
                .expression_attribute_values(":old", item[ROW].clone());
            match self.transact(op, vec![put(write)]).await? {
                Ok(()) => return Ok(()),
                Err(c) if c.failed(0) => continue,
                Err(c) => return Err(self.remote(op, c.to_string())),
            }
        }
        Err(self.remote(
            op,
            format!("the claim changed under each of {ATTEMPTS} attempts"),
        ))
    }

    /// Appends `events` after `lead` (a minion row, written with the first
    /// batch), in as many fenced transactions as they need.
    async fn append(
        &self,
        op: &str,
        mut lead: Option<TransactWriteItem>,
        events: &[EventRow],
    ) -> Result<Vec<u64>, StoreError> {
        self.leading(op)?;
        let _one_at_a_time = self.append.lock().await;
        let mut seqs = Vec::with_capacity(events.len());
        let mut rest = events;
        while !rest.is_empty() {
            // The fence's check and the seq item take two places.
            let room = MAX_TRANSACT_ITEMS - 2 - usize::from(lead.is_some());
            let (batch, tail) = rest.split_at(room.min(rest.len()));
            seqs.extend(self.append_batch(op, lead.take(), batch).await?);
            rest = tail;
        }
        Ok(seqs)
    }

    /// One transaction: `lead`, the seq item moved on by `events.len()`
    /// (conditioned on the value read), and the events.
    async fn append_batch(
        &self,
        op: &str,
        lead: Option<TransactWriteItem>,
        events: &[EventRow],
    ) -> Result<Vec<u64>, StoreError> {
        let seq_at = usize::from(lead.is_some());
        for _ in 0..ATTEMPTS {
            let last = match self.get(op, META, EVENT_SEQ_SK).await? {
                Some(item) => {
                    Some(self.number::<u64>(&item, SEQ, || "the event sequence number".to_owned())?)
                }
                None => None,
            };
            let first = last.unwrap_or(0) + 1;
            let seqs: Vec<u64> = (first..).take(events.len()).collect();
            let newest = first + events.len() as u64 - 1;
            let mut seq_item = key(META, EVENT_SEQ_SK);
            seq_item.insert(SEQ.to_owned(), number(newest));
            let seq_write = match last {
                Some(last) => self
                    .put(seq_item)
                    .condition_expression("#seq = :last")
                    .expression_attribute_names("#seq", SEQ)
                    .expression_attribute_values(":last", number(last)),
                None => self
                    .put(seq_item)
                    .condition_expression("attribute_not_exists(#pk)")
                    .expression_attribute_names("#pk", PK),
            };
            let mut items: Vec<TransactWriteItem> = lead.iter().cloned().collect();
            items.push(put(seq_write));
            for (seq, event) in seqs.iter().zip(events) {
                items.push(put(self
                    .put(event_item(*seq, event))
                    .condition_expression("attribute_not_exists(#pk)")
                    .expression_attribute_names("#pk", PK)));
            }
            match self.transact(op, items).await? {
                Ok(()) => return Ok(seqs),
                // Another append took these numbers first: read again.
                Err(c) if c.failed(seq_at) => continue,
                Err(c) => return Err(self.remote(op, c.to_string())),
            }
        }
        Err(self.remote(
            op,
            format!("the event sequence number changed under each of {ATTEMPTS} attempts"),
        ))
    }

    /// The newest `limit` events passing `filter`, oldest first.
    async fn newest_events(
        &self,
        op: &str,
        filter: Filter,
        limit: usize,
    ) -> Result<Vec<EventRow>, StoreError> {
        let mut events = Vec::new();
        if limit == 0 {
            return Ok(events);
        }
        self.query(op, EVENT, Some(&filter), true, |item| {
            events.push(self.event_from(&item)?);
            Ok(events.len() < limit)
        })
        .await?;
        events.reverse();
        Ok(events)
    }

    /// Deletes the events older than `before_ms`, in fenced batches; a
    /// failure part way leaves the earlier batches deleted.
    async fn prune(&self, op: &str, before_ms: i64) -> Result<u64, StoreError> {
        self.leading(op)?;
        let filter = Filter {
            expression: "#at < :before".to_owned(),
            names: vec![("#at", AT_MS)],
            values: vec![(":before", number(before_ms))],
        };
        let mut old = Vec::new();
        self.query(op, EVENT, Some(&filter), false, |item| {
            old.push(sort_key(&item).unwrap_or_default().to_owned());
            Ok(true)
        })
        .await?;
        let mut deleted = 0;
        for batch in old.chunks(MAX_TRANSACT_ITEMS - 1) {
            let items = batch
                .iter()
                .map(|sk| delete(self.delete(EVENT, sk)))
                .collect();
            self.write(op, items).await?;
            deleted += batch.len() as u64;
        }
        Ok(deleted)
    }

    async fn claim_join(
        &self,
        op: &str,
        instance: &str,
        fleet: &str,
        at_ms: i64,
    ) -> Result<Option<i64>, StoreError> {
        self.leading(op)?;
        let row = serde_json::json!({ "instance": instance, "fleet": fleet, "joined_ms": at_ms });
        let mut item = key(IDENTITY, instance);
        item.insert(ROW.to_owned(), AttributeValue::S(row.to_string()));
        for _ in 0..ATTEMPTS {
            let claim = self
                .put(item.clone())
                .condition_expression("attribute_not_exists(#pk)")
                .expression_attribute_names("#pk", PK)
                .return_values_on_condition_check_failure(
                    ReturnValuesOnConditionCheckFailure::AllOld,
                );
            let cancelled = match self.transact(op, vec![put(claim)]).await? {
                Ok(()) => return Ok(None),
                Err(c) if c.failed(0) => c,
                Err(c) => return Err(self.remote(op, c.to_string())),
            };
            let earlier = match cancelled.old_item(0) {
                Some(earlier) => Some(earlier.clone()),
                None => self.get(op, IDENTITY, instance).await?,
            };
            if let Some(earlier) = earlier {
                return Ok(Some(self.join_from(&earlier)?.1));
            }
            // Forgotten in between: claim again.
        }
        Err(self.remote(
            op,
            format!("the join changed under each of {ATTEMPTS} attempts"),
        ))
    }

    async fn forget_join(&self, op: &str, instance: &str) -> Result<Option<String>, StoreError> {
        self.leading(op)?;
        for _ in 0..ATTEMPTS {
            let Some(item) = self.get(op, IDENTITY, instance).await? else {
                return Ok(None);
            };
            let (fleet, _) = self.join_from(&item)?;
            let forget = self
                .delete(IDENTITY, instance)
                .condition_expression("#row = :old")
                .expression_attribute_names("#row", ROW)
                .expression_attribute_values(":old", item[ROW].clone());
            match self.transact(op, vec![delete(forget)]).await? {
                Ok(()) => return Ok(Some(fleet)),
                Err(c) if c.failed(0) => continue,
                Err(c) => return Err(self.remote(op, c.to_string())),
            }
        }
        Err(self.remote(
            op,
            format!("the join changed under each of {ATTEMPTS} attempts"),
        ))
    }

    /// The fleet and time of an identity join item.
    fn join_from(&self, item: &Item) -> Result<(String, i64), StoreError> {
        let what = || format!("identity join {}", sort_key(item).unwrap_or("?"));
        let row: serde_json::Value = self.decode(item, IDENTITY, |r| serde_json::from_str(r))?;
        match (row["fleet"].as_str(), row["joined_ms"].as_i64()) {
            (Some(fleet), Some(joined_ms)) => Ok((fleet.to_owned(), joined_ms)),
            _ => Err(self.decode_err(what(), format!("no fleet and joined_ms in {row}"))),
        }
    }

    fn event_from(&self, item: &Item) -> Result<EventRow, StoreError> {
        let sk = sort_key(item).unwrap_or_default();
        let seq: u64 = sk.parse().map_err(|_| {
            self.decode_err(format!("event {sk}"), "the key is not a sequence number")
        })?;
        let row: EventRow = self.decode(item, EVENT, |r| serde_json::from_str(r))?;
        // The key is the authority on the number.
        Ok(EventRow { seq, ..row })
    }

    /// The `row` of an item of kind `kind`, parsed.
    fn decode<T>(
        &self,
        item: &Item,
        kind: &str,
        parse: impl FnOnce(&str) -> serde_json::Result<T>,
    ) -> Result<T, StoreError> {
        let what = || format!("{kind} {}", sort_key(item).unwrap_or("?"));
        let Some(AttributeValue::S(row)) = item.get(ROW) else {
            return Err(self.decode_err(what(), "no row attribute"));
        };
        parse(row).map_err(|e| self.decode_err(what(), e.to_string()))
    }

    /// Refuses an item whose key and row disagree (edited by hand).
    fn same_key(&self, item: &Item, kind: &str, id: &str) -> Result<(), StoreError> {
        let sk = sort_key(item).unwrap_or_default();
        if sk != id {
            return Err(
                self.decode_err(format!("{kind} {sk}"), format!("its row names {kind} {id}"))
            );
        }
        Ok(())
    }

    /// A number attribute.
    fn number<T: std::str::FromStr>(
        &self,
        item: &Item,
        name: &str,
        what: impl Fn() -> String,
    ) -> Result<T, StoreError> {
        match item.get(name) {
            Some(AttributeValue::N(n)) => n
                .parse()
                .map_err(|_| self.decode_err(what(), format!("{name} is {n}"))),
            _ => Err(self.decode_err(what(), format!("no number {name}"))),
        }
    }
}

/// The key of item `pk`/`sk`, as an item to add attributes to.
fn key(pk: &str, sk: &str) -> Item {
    HashMap::from([
        (PK.to_owned(), AttributeValue::S(pk.to_owned())),
        (SK.to_owned(), AttributeValue::S(sk.to_owned())),
    ])
}

fn sort_key(item: &Item) -> Option<&str> {
    match item.get(SK) {
        Some(AttributeValue::S(sk)) => Some(sk),
        _ => None,
    }
}

fn number(n: impl fmt::Display) -> AttributeValue {
    AttributeValue::N(n.to_string())
}

fn put(put: PutBuilder) -> TransactWriteItem {
    TransactWriteItem::builder()
        .put(put.build().expect("table and item are set"))
        .build()
}

fn delete(delete: DeleteBuilder) -> TransactWriteItem {
    TransactWriteItem::builder()
        .delete(delete.build().expect("table and key are set"))
        .build()
}

fn minion_item(m: &MinionRow) -> Item {
    let mut item = key(MINION, &m.id);
    item.insert(ROW.to_owned(), AttributeValue::S(encode!(m)));
    item
}

fn ledger_item(row: &LedgerRow) -> Item {
    let mut item = key(LEDGER, &row.instance);
    item.insert(ROW.to_owned(), AttributeValue::S(encode!(row)));
    if let Some(at) = row.confirmed_ms {
        item.insert(CONFIRMED_MS.to_owned(), number(at));
    }
    item
}

fn event_item(seq: u64, e: &EventRow) -> Item {
    let row = EventRow { seq, ..e.clone() };
    let mut item = key(EVENT, &format!("{seq:020}"));
    item.insert(ROW.to_owned(), AttributeValue::S(encode!(&row)));
    item.insert(AT_MS.to_owned(), number(e.at_ms));
    item.insert(EVENT_FLEET.to_owned(), AttributeValue::S(e.fleet.clone()));
    if let Some(minion) = &e.minion {
        item.insert(EVENT_MINION.to_owned(), AttributeValue::S(minion.clone()));
    }
    item
}

fn schema_item(version: u32) -> Item {
    let mut item = key(META, SCHEMA_SK);
    item.insert(SCHEMA_VERSION_ATTR.to_owned(), number(version));
    item
}

/// `CODE: message` when AWS answered with an error, the whole error chain
/// otherwise (a timeout, a connection failure, an unreadable answer).
fn sdk_detail<E, R>(err: &SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: fmt::Debug,
{
    match (err.code(), err.message()) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_owned(),
        _ => DisplayErrorContext(err).to_string(),
    }
}

/// Cancellation reasons, one per item: "[None, ConditionalCheckFailed: …]".
fn reasons(reasons: &[CancellationReason]) -> String {
    let each: Vec<String> = reasons
        .iter()
        .map(|r| match (r.code(), r.message()) {
            (Some(code), Some(message)) => format!("{code}: {message}"),
            (Some(code), None) => code.to_owned(),
            (None, _) => "None".to_owned(),
        })
        .collect();
    format!("[{}]", each.join(", "))
}
