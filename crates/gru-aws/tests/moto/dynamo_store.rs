//! `DynamoStore` against moto's DynamoDB: the same behaviour as the SQLite
//! store (gru-controller's `store::sqlite` tests, mirrored here), and the
//! fencing that only the DynamoDB store has.
//!
//! Each test has its own account and table. A test leads by writing the
//! lease item itself (what the lease would do) and setting the store's
//! fence; "another controller takes the lease" is the same item written
//! with a higher version. The store's methods are synchronous and are
//! called straight from the test's tokio task, as the controller calls them.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;

use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType,
};
use gru_aws::dynamo::{self, DynamoStore, Fence};
use gru_aws::testing::random_account;
use gru_controller::store::conformance;
use gru_controller::store::examples::{event, fleet, full_minion, history, minion};
use gru_controller::store::{EventRow, LedgerRow, Loaded, SCHEMA_VERSION, Store, StoreError};

use super::{bounded, moto};

const TABLE: &str = "gru-state";

/// A client on a fresh, empty moto account.
fn account() -> aws_sdk_dynamodb::Client {
    gru_aws::testing::dynamodb_client(&moto().url, &random_account())
}

/// A client on a fresh account holding the state table.
async fn table() -> aws_sdk_dynamodb::Client {
    let client = account();
    dynamo::create_table(&client, TABLE)
        .await
        .expect("CreateTable");
    client
}

/// Writes the lease item with `version`, as the controller taking the lease
/// would.
async fn lease(client: &aws_sdk_dynamodb::Client, version: u64) {
    client
        .put_item()
        .table_name(TABLE)
        .item(dynamo::PK, s(dynamo::LEASE_PK))
        .item(dynamo::SK, s(dynamo::LEASE_SK))
        .item(dynamo::TERM, AttributeValue::N(version.to_string()))
        .send()
        .await
        .expect("PutItem lease");
}

/// A store whose fence is `version` (0: not leading).
async fn open(client: &aws_sdk_dynamodb::Client, version: u64) -> DynamoStore {
    let fence = Fence::default();
    fence.set(version);
    DynamoStore::open(client.clone(), TABLE, fence)
        .await
        .expect("open the store")
}

/// Takes the lease at `version` and opens a store leading under it.
async fn leader(client: &aws_sdk_dynamodb::Client, version: u64) -> DynamoStore {
    lease(client, version).await;
    open(client, version).await
}

/// Every item of the table, each as its sorted attributes, read directly.
async fn everything(client: &aws_sdk_dynamodb::Client) -> Vec<BTreeMap<String, String>> {
    let mut all = Vec::new();
    let mut start = None;
    loop {
        let page = client
            .scan()
            .table_name(TABLE)
            .consistent_read(true)
            .set_exclusive_start_key(start.take())
            .send()
            .await
            .expect("Scan");
        for item in page.items.unwrap_or_default() {
            all.push(
                item.into_iter()
                    .map(|(k, v)| (k, format!("{v:?}")))
                    .collect(),
            );
        }
        match page.last_evaluated_key {
            Some(key) if !key.is_empty() => start = Some(key),
            _ => break,
        }
    }
    all.sort();
    all
}

/// One item, read directly.
async fn raw_item(
    client: &aws_sdk_dynamodb::Client,
    pk: &str,
    sk: &str,
) -> Option<std::collections::HashMap<String, AttributeValue>> {
    client
        .get_item()
        .table_name(TABLE)
        .key(dynamo::PK, s(pk))
        .key(dynamo::SK, s(sk))
        .consistent_read(true)
        .send()
        .await
        .expect("GetItem")
        .item
}

fn s(value: &str) -> AttributeValue {
    AttributeValue::S(value.to_owned())
}

fn messages(events: &[EventRow]) -> Vec<String> {
    events.iter().map(|e| e.message.clone()).collect()
}

fn seqs(events: &[EventRow]) -> Vec<u64> {
    events.iter().map(|e| e.seq).collect()
}

/// Asserts `result` is a `Fenced` refusal under `version`.
fn assert_fenced<T: Debug>(what: &str, result: Result<T, StoreError>, version: u64) {
    match result {
        Err(StoreError::Fenced { version: v, .. }) if v == version => {}
        other => panic!("{what}: expected Fenced (version {version}), got {other:?}"),
    }
}

#[tokio::test]
async fn every_row_survives_a_reopen() {
    bounded(async {
        let client = table().await;
        let store = leader(&client, 1).await;
        assert_eq!(store.location().display().to_string(), "dynamodb:gru-state");
        assert_eq!(store.kind(), "dynamodb");
        assert_eq!(store.table(), TABLE);
        assert_eq!(store.load().unwrap(), Loaded::default());

        store.put_minion(&full_minion("m-1")).unwrap();
        store.put_minion(&minion("m-0")).unwrap();
        store.put_fleet(&fleet("web")).unwrap();
        store.put_fleet(&fleet("batch")).unwrap();
        store.put_fleet_history(&history("web")).unwrap();
        assert!(store.claim_decrement("i-2", "m-2", "web", 3).unwrap());
        assert!(store.claim_decrement("i-1", "m-1", "web", 4).unwrap());
        store.confirm_decrement("i-1", 5).unwrap();
        assert_eq!(store.claim_identity_join("i-1", "web", 10).unwrap(), None);
        let appended = [event(1, "web", Some("m-1")), event(2, "batch", None)];
        assert_eq!(store.append_events(&appended).unwrap(), [1, 2]);
        drop(store);

        let expected = Loaded {
            minions: vec![minion("m-0"), full_minion("m-1")],
            fleets: vec![fleet("batch"), fleet("web")],
            ledger: vec![
                LedgerRow {
                    instance: "i-1".to_owned(),
                    minion: "m-1".to_owned(),
                    fleet: "web".to_owned(),
                    asked_ms: 4,
                    confirmed_ms: Some(5),
                },
                LedgerRow {
                    instance: "i-2".to_owned(),
                    minion: "m-2".to_owned(),
                    fleet: "web".to_owned(),
                    asked_ms: 3,
                    confirmed_ms: None,
                },
            ],
            histories: vec![history("web")],
        };
        // A standby reads what the leader wrote.
        let standby = open(&client, 0).await;
        assert_eq!(standby.load().unwrap(), expected);
        let events = standby.events_since(i64::MIN, None, 10).unwrap();
        let mut numbered = appended.to_vec();
        numbered[0].seq = 1;
        numbered[1].seq = 2;
        assert_eq!(events, numbered);

        // So does the next leader, which also finds the join and the claims.
        lease(&client, 2).await;
        let next = open(&client, 2).await;
        assert_eq!(next.load().unwrap(), expected);
        assert_eq!(
            next.claim_identity_join("i-1", "web", 30).unwrap(),
            Some(10)
        );
        assert!(!next.claim_decrement("i-1", "m-1", "web", 31).unwrap());
        assert!(!next.claim_decrement("i-2", "m-2", "web", 31).unwrap());
        assert_eq!(next.append_events(&[event(3, "web", None)]).unwrap(), [3]);
    })
    .await;
}

#[tokio::test]
async fn put_replaces_and_delete_forgets() {
    bounded(async {
        let client = table().await;
        conformance::put_replaces_and_delete_forgets(&leader(&client, 1).await);
    })
    .await;
}

#[tokio::test]
async fn a_minion_and_its_events_land_together() {
    bounded(async {
        let client = table().await;
        conformance::a_minion_and_its_events_land_together(&leader(&client, 1).await);
    })
    .await;
}

#[tokio::test]
async fn decrement_claims() {
    bounded(async {
        let client = table().await;
        let first = leader(&client, 1).await;
        // Opened now, used once the first is dropped.
        let second = open(&client, 1).await;
        conformance::decrement_claims(first, || second);
    })
    .await;
}

#[tokio::test]
async fn an_identity_join_is_once_until_forgotten_and_survives_a_reopen() {
    bounded(async {
        let client = table().await;
        let first = leader(&client, 1).await;
        let second = open(&client, 1).await;
        conformance::an_identity_join_is_once_until_forgotten(first, || second);
    })
    .await;
}

#[tokio::test]
async fn events_since_filters_orders_and_keeps_the_newest() {
    bounded(async {
        let client = table().await;
        conformance::events_since_filters_orders_and_keeps_the_newest(&leader(&client, 1).await);
    })
    .await;
}

#[tokio::test]
async fn minion_events_are_that_minions_oldest_first() {
    bounded(async {
        let client = table().await;
        conformance::minion_events_are_that_minions_oldest_first(&leader(&client, 1).await);
    })
    .await;
}

#[tokio::test]
async fn prune_deletes_older_and_never_reuses_seqs() {
    bounded(async {
        let client = table().await;
        let first = leader(&client, 1).await;
        let second = open(&client, 1).await;
        conformance::prune_deletes_older_and_never_reuses_seqs(first, || second);
    })
    .await;
}

#[tokio::test]
async fn an_append_larger_than_one_transaction_gets_consecutive_seqs() {
    bounded(async {
        let client = table().await;
        let store = leader(&client, 1).await;
        assert_eq!(store.append_events(&[event(0, "web", None)]).unwrap(), [1]);
        let many: Vec<EventRow> = (1..=250).map(|at| event(at, "web", None)).collect();
        let given = store.append_events(&many).unwrap();
        assert_eq!(given, (2..=251).collect::<Vec<u64>>());

        let all = store.events_since(i64::MIN, None, 1000).unwrap();
        assert_eq!(seqs(&all), (1..=251).collect::<Vec<u64>>());
        assert_eq!(all[250].message, "at 250");
        let newest = store.events_since(i64::MIN, None, 3).unwrap();
        assert_eq!(messages(&newest), ["at 248", "at 249", "at 250"]);

        // A prune of more than one transaction's worth.
        assert_eq!(store.prune_events(201).unwrap(), 201);
        let left = store.events_since(i64::MIN, None, 1000).unwrap();
        assert_eq!(seqs(&left), (202..=251).collect::<Vec<u64>>());
        assert_eq!(
            store.append_events(&[event(300, "web", None)]).unwrap(),
            [252]
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_from_many_tasks_get_distinct_seqs() {
    bounded(async {
        let client = table().await;
        let store = Arc::new(leader(&client, 1).await);
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    let mut mine = Vec::new();
                    for round in 0..5 {
                        let at = t * 100 + round;
                        mine.extend(
                            store
                                .append_events(&[event(at, "web", None), event(at, "web", None)])
                                .unwrap(),
                        );
                    }
                    mine
                })
            })
            .collect();
        let mut all = Vec::new();
        for task in tasks {
            let mine = task.await.unwrap();
            // Each task's own appends come out in its order.
            assert!(mine.windows(2).all(|w| w[0] < w[1]), "{mine:?}");
            all.extend(mine);
        }
        all.sort_unstable();
        assert_eq!(all, (1..=80).collect::<Vec<u64>>());
        let stored = store.events_since(i64::MIN, None, 1000).unwrap();
        assert_eq!(seqs(&stored), (1..=80).collect::<Vec<u64>>());
    })
    .await;
}

/// Every write of `store`, each expected to be refused under `version`;
/// the table is read before and after and must be unchanged.
async fn assert_every_write_fenced(
    client: &aws_sdk_dynamodb::Client,
    store: &DynamoStore,
    version: u64,
) {
    let before = everything(client).await;
    assert_fenced("put_minion", store.put_minion(&minion("m-9")), version);
    assert_fenced(
        "put_minion_with_events",
        store.put_minion_with_events(&minion("m-9"), &[event(9, "web", Some("m-9"))]),
        version,
    );
    assert_fenced(
        "put_minion_with_events, no events",
        store.put_minion_with_events(&minion("m-9"), &[]),
        version,
    );
    assert_fenced("delete_minion", store.delete_minion("m-1"), version);
    assert_fenced("put_fleet", store.put_fleet(&fleet("web")), version);
    assert_fenced(
        "claim_decrement of a new instance",
        store.claim_decrement("i-9", "m-9", "web", 9),
        version,
    );
    assert_fenced(
        "claim_decrement of a claimed instance",
        store.claim_decrement("i-1", "m-1", "web", 9),
        version,
    );
    assert_fenced("release_decrement", store.release_decrement("i-1"), version);
    assert_fenced(
        "confirm_decrement",
        store.confirm_decrement("i-1", 9),
        version,
    );
    assert_fenced(
        "append_events",
        store.append_events(&[event(9, "web", None)]),
        version,
    );
    assert_fenced("prune_events", store.prune_events(i64::MAX), version);
    assert_fenced(
        "claim_identity_join of a new instance",
        store.claim_identity_join("i-9", "web", 9),
        version,
    );
    assert_fenced(
        "forget_identity_join",
        store.forget_identity_join("i-1"),
        version,
    );
    assert_fenced(
        "record_intent",
        store.record_intent("web", "terminate i-1", 9).await,
        version,
    );
    let err = store.put_minion(&minion("m-9")).unwrap_err();
    assert!(
        err.to_string().contains("no longer holds the leader lease"),
        "{err}"
    );
    assert!(err.to_string().contains("dynamodb:gru-state"), "{err}");
    assert_eq!(everything(client).await, before, "the table changed");
}

#[tokio::test]
async fn a_controller_that_does_not_lead_writes_nothing() {
    bounded(async {
        let client = table().await;
        // Another controller leads and wrote some state.
        let other = leader(&client, 1).await;
        other.put_minion(&minion("m-1")).unwrap();
        assert!(other.claim_decrement("i-1", "m-1", "web", 1).unwrap());
        assert_eq!(other.claim_identity_join("i-1", "web", 1).unwrap(), None);
        other.append_events(&[event(1, "web", None)]).unwrap();

        let standby = open(&client, 0).await;
        assert_every_write_fenced(&client, &standby, 0).await;
        // It reads, though.
        assert_eq!(standby.load().unwrap().minions, [minion("m-1")]);
        assert_eq!(standby.events_since(0, None, 10).unwrap().len(), 1);
    })
    .await;
}

#[tokio::test]
async fn a_standby_load_does_not_mark_a_new_table() {
    bounded(async {
        let client = table().await;
        lease(&client, 1).await;
        let standby = open(&client, 0).await;
        let before = everything(&client).await;
        assert_eq!(standby.load().unwrap(), Loaded::default());
        assert_eq!(everything(&client).await, before);

        // The leader's load marks it with this build's schema version.
        let store = open(&client, 1).await;
        store.load().unwrap();
        let meta = raw_item(&client, "meta", "schema")
            .await
            .expect("meta/schema");
        assert_eq!(
            meta.get("version"),
            Some(&AttributeValue::N(SCHEMA_VERSION.to_string()))
        );
    })
    .await;
}

#[tokio::test]
async fn a_deposed_leader_writes_nothing() {
    bounded(async {
        let client = table().await;
        let old = leader(&client, 1).await;
        old.load().unwrap();
        old.put_minion(&minion("m-1")).unwrap();
        assert!(old.claim_decrement("i-1", "m-1", "web", 1).unwrap());
        assert_eq!(old.claim_identity_join("i-1", "web", 1).unwrap(), None);
        old.append_events(&[event(1, "web", None)]).unwrap();
        old.record_intent("web", "terminate i-1 with a decrement", 2)
            .await
            .unwrap();
        let intent = raw_item(&client, "intent", "web")
            .await
            .expect("the intent");
        let Some(AttributeValue::S(row)) = intent.get("row") else {
            panic!("no row in {intent:?}");
        };
        assert!(row.contains("terminate i-1 with a decrement"), "{row}");

        // Another controller takes the lease.
        lease(&client, 2).await;
        assert_every_write_fenced(&client, &old, 1).await;

        // The new leader writes, and sees only what the old one wrote
        // while it led.
        let new = open(&client, 2).await;
        new.put_minion(&minion("m-2")).unwrap();
        assert_eq!(new.load().unwrap().minions, [minion("m-1"), minion("m-2")]);
        assert_eq!(new.append_events(&[event(2, "web", None)]).unwrap(), [2]);
        // The old one's fence follows the lease again only when it takes
        // it back; until then it stays refused.
        assert_fenced("put_minion", old.put_minion(&minion("m-3")), 1);
    })
    .await;
}

#[tokio::test]
async fn open_on_a_missing_table_names_it() {
    bounded(async {
        let client = account();
        let err = DynamoStore::open(client, "gru-nowhere", Fence::default())
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Remote { .. }), "{err}");
        let message = err.to_string();
        assert!(message.contains("gru-nowhere"), "{message}");
        assert!(message.contains("does not exist"), "{message}");
        assert!(message.contains("StateTable"), "{message}");
    })
    .await;
}

#[tokio::test]
async fn a_table_with_another_key_is_refused() {
    bounded(async {
        let client = account();
        client
            .create_table()
            .table_name(TABLE)
            .billing_mode(BillingMode::PayPerRequest)
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name("id")
                    .key_type(KeyType::Hash)
                    .build()
                    .unwrap(),
            )
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name("id")
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .unwrap(),
            )
            .send()
            .await
            .expect("CreateTable");
        let err = DynamoStore::open(client, TABLE, Fence::default())
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        let message = err.to_string();
        assert!(message.contains("gru-state"), "{message}");
        assert!(message.contains("id (HASH)"), "{message}");
        assert!(message.contains("StateTable"), "{message}");
    })
    .await;
}

#[tokio::test]
async fn a_newer_schema_version_is_refused() {
    bounded(async {
        let client = table().await;
        let store = leader(&client, 1).await;
        store.put_minion(&minion("m-1")).unwrap();
        let newer = SCHEMA_VERSION + 1;
        client
            .put_item()
            .table_name(TABLE)
            .item(dynamo::PK, s("meta"))
            .item(dynamo::SK, s("schema"))
            .item("version", AttributeValue::N(newer.to_string()))
            .send()
            .await
            .expect("PutItem meta/schema");
        let before = everything(&client).await;

        let err = DynamoStore::open(client.clone(), TABLE, Fence::default())
            .await
            .unwrap_err();
        let is_newer = |err: &StoreError| {
            matches!(err, StoreError::Newer { found, supported, .. }
                if *found == newer && *supported == SCHEMA_VERSION)
        };
        assert!(is_newer(&err), "{err}");
        assert!(err.to_string().contains("written by a newer gru"), "{err}");
        assert!(err.to_string().contains("dynamodb:gru-state"), "{err}");

        // A store opened before the newer gru came refuses on its next load.
        let err = store.load().unwrap_err();
        assert!(is_newer(&err), "{err}");
        assert_eq!(everything(&client).await, before);
    })
    .await;
}

#[tokio::test]
async fn a_call_that_gets_no_answer_is_bounded() {
    bounded(async {
        // A listener nobody serves: the kernel accepts the connection, the
        // request goes out, and no answer ever comes.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", silent.local_addr().unwrap());
        let client = gru_aws::testing::dynamodb_client(&url, &random_account());
        let started = std::time::Instant::now();
        let err = DynamoStore::open(client, TABLE, Fence::default())
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Remote { .. }), "{err}");
        assert!(err.to_string().contains("no answer within 10s"), "{err}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
        drop(silent);
    })
    .await;
}
