//! What every [`Store`] backend must do, as checks its own tests run: the
//! SQLite store's unit tests and the DynamoDB store's tests on moto call
//! each of these on a fresh, empty store (one whose writes are allowed: the
//! DynamoDB one leading), so both backends meet the same contract.
//!
//! Functions that check what survives take the store by value and a
//! `reopen` that gives a second store on the same data once the first is
//! dropped.

use super::examples::{event, fleet, full_minion, minion};
use super::{EventRow, HistoryRow, MinionRow, Store, StoreError};

fn messages(events: &[EventRow]) -> Vec<&str> {
    events.iter().map(|e| e.message.as_str()).collect()
}

fn seqs(events: &[EventRow]) -> Vec<u64> {
    events.iter().map(|e| e.seq).collect()
}

/// Puts replace by key; deleting a minion forgets its row and keeps its
/// events; deleting one that never existed is no error.
pub fn put_replaces_and_delete_forgets(store: &dyn Store) {
    store.put_minion(&full_minion("m-1")).unwrap();
    store.put_minion(&minion("m-2")).unwrap();
    let replaced = MinionRow {
        state: "Gone".to_owned(),
        ..minion("m-1")
    };
    store.put_minion(&replaced).unwrap();
    assert_eq!(store.load().unwrap().minions, [replaced, minion("m-2")]);

    store
        .append_events(&[event(1, "web", Some("m-2"))])
        .unwrap();
    store.delete_minion("m-2").unwrap();
    store.delete_minion("never-existed").unwrap();
    assert_eq!(store.load().unwrap().minions.len(), 1);
    assert_eq!(store.minion_events("m-2", 10).unwrap().len(), 1);

    let mut web = fleet("web");
    store.put_fleet(&web).unwrap();
    web.paused = None;
    web.pin = None;
    web.policy_memory = "y".to_owned();
    store.put_fleet(&web).unwrap();
    assert_eq!(store.load().unwrap().fleets, [web.clone()]);

    // A fleet's history is its own row, replaced by the next.
    let history = |text: &str| HistoryRow {
        name: "web".to_owned(),
        history: text.to_owned(),
    };
    store.put_fleet_history(&history("old")).unwrap();
    let big = "x".repeat(64 * 1024);
    store.put_fleet_history(&history(&big)).unwrap();
    let loaded = store.load().unwrap();
    assert_eq!(loaded.histories, [history(&big)]);
    assert_eq!(loaded.fleets, [web]);
}

/// A minion's row and its events land together, numbered in order; with
/// no events, the row alone; with more events than a DynamoDB transaction
/// holds, all of them, numbered consecutively.
pub fn a_minion_and_its_events_land_together(store: &dyn Store) {
    let m = minion("m-1");
    store
        .put_minion_with_events(
            &m,
            &[event(1, "web", Some("m-1")), event(2, "web", Some("m-1"))],
        )
        .unwrap();
    assert_eq!(store.load().unwrap().minions, vec![m.clone()]);
    let history = store.minion_events("m-1", 10).unwrap();
    assert_eq!(messages(&history), ["at 1", "at 2"]);
    assert_eq!(seqs(&history), [1, 2]);

    let draining = MinionRow {
        state: "Draining:Flushing".to_owned(),
        ..m.clone()
    };
    store.put_minion_with_events(&draining, &[]).unwrap();
    assert_eq!(store.load().unwrap().minions, [draining]);
    assert_eq!(store.minion_events("m-1", 10).unwrap().len(), 2);

    let gone = MinionRow {
        state: "Gone".to_owned(),
        ..m
    };
    let many: Vec<EventRow> = (3..=152).map(|at| event(at, "web", Some("m-1"))).collect();
    store.put_minion_with_events(&gone, &many).unwrap();
    assert_eq!(store.load().unwrap().minions, [gone]);
    let history = store.minion_events("m-1", 1000).unwrap();
    assert_eq!(seqs(&history), (1..=152).collect::<Vec<u64>>());
    assert_eq!(history[151].message, "at 152");
}

/// One standing claim per instance; a release drops an unconfirmed claim
/// only; a confirmation keeps its first time; confirming without a claim
/// is [`StoreError::NoClaim`]; all of it survives a reopen.
pub fn decrement_claims<S: Store>(store: S, reopen: impl FnOnce() -> S) {
    assert!(store.claim_decrement("i-1", "m-1", "web", 1).unwrap());
    assert!(!store.claim_decrement("i-1", "m-1", "web", 2).unwrap());
    // The losing claim did not overwrite the standing one.
    assert_eq!(store.load().unwrap().ledger[0].asked_ms, 1);

    store.release_decrement("i-1").unwrap();
    assert!(store.load().unwrap().ledger.is_empty());
    assert!(store.claim_decrement("i-1", "m-1", "web", 3).unwrap());

    store.confirm_decrement("i-1", 4).unwrap();
    store.confirm_decrement("i-1", 5).unwrap();
    store.release_decrement("i-1").unwrap();
    assert!(!store.claim_decrement("i-1", "m-1", "web", 6).unwrap());
    store.release_decrement("i-never").unwrap();

    let err = store.confirm_decrement("i-2", 7).unwrap_err();
    assert!(
        matches!(&err, StoreError::NoClaim { instance, .. } if instance == "i-2"),
        "{err}"
    );
    assert!(err.to_string().contains("i-2"), "{err}");
    drop(store);

    let store = reopen();
    assert!(!store.claim_decrement("i-1", "m-1", "web", 8).unwrap());
    store.release_decrement("i-1").unwrap();
    assert!(!store.claim_decrement("i-1", "m-1", "web", 9).unwrap());
    let ledger = store.load().unwrap().ledger;
    assert_eq!(ledger.len(), 1);
    assert_eq!((ledger[0].asked_ms, ledger[0].confirmed_ms), (3, Some(4)));
}

/// An instance joins with its identity document once: a second claim
/// gives the first one's time, also after a reopen, until it is forgotten
/// (which names the fleet it had joined).
pub fn an_identity_join_is_once_until_forgotten<S: Store>(store: S, reopen: impl FnOnce() -> S) {
    assert_eq!(store.claim_identity_join("i-1", "web", 10).unwrap(), None);
    assert_eq!(
        store.claim_identity_join("i-1", "web", 20).unwrap(),
        Some(10)
    );
    drop(store);

    let store = reopen();
    assert_eq!(
        store.claim_identity_join("i-1", "web", 30).unwrap(),
        Some(10)
    );
    assert_eq!(
        store.forget_identity_join("i-1").unwrap().as_deref(),
        Some("web")
    );
    assert_eq!(store.forget_identity_join("i-1").unwrap(), None);
    assert_eq!(store.claim_identity_join("i-1", "batch", 40).unwrap(), None);
    assert_eq!(
        store.forget_identity_join("i-1").unwrap().as_deref(),
        Some("batch")
    );
}

/// Events since a time, of all fleets or one, oldest first by append
/// order (even when the clock stepped back), the newest `limit` of them.
pub fn events_since_filters_orders_and_keeps_the_newest(store: &dyn Store) {
    let given = store
        .append_events(&[
            event(10, "web", None),
            event(20, "batch", None),
            event(20, "web", Some("m-1")),
            event(30, "web", None),
            event(40, "batch", None),
        ])
        .unwrap();
    assert_eq!(given, [1, 2, 3, 4, 5]);
    assert_eq!(store.append_events(&[]).unwrap(), Vec::<u64>::new());

    let all = store.events_since(20, None, 100).unwrap();
    assert_eq!(messages(&all), ["at 20", "at 20", "at 30", "at 40"]);
    assert_eq!(seqs(&all), [2, 3, 4, 5]);

    let web = store.events_since(0, Some("web"), 100).unwrap();
    assert_eq!(messages(&web), ["at 10", "at 20", "at 30"]);
    assert!(web.iter().all(|e| e.fleet == "web"));

    let newest = store.events_since(0, Some("web"), 2).unwrap();
    assert_eq!(messages(&newest), ["at 20", "at 30"]);
    let newest = store.events_since(0, None, 1).unwrap();
    assert_eq!(messages(&newest), ["at 40"]);
    assert!(store.events_since(0, None, 0).unwrap().is_empty());
    assert!(store.events_since(41, None, 10).unwrap().is_empty());
    assert!(store.events_since(0, Some("nope"), 10).unwrap().is_empty());

    store.append_events(&[event(15, "web", None)]).unwrap();
    let web = store.events_since(0, Some("web"), 100).unwrap();
    assert_eq!(messages(&web), ["at 10", "at 20", "at 30", "at 15"]);
    assert_eq!(seqs(&web), [1, 3, 4, 6]);
}

/// One minion's events, oldest first, the newest `limit` of them.
pub fn minion_events_are_that_minions_oldest_first(store: &dyn Store) {
    store
        .append_events(&[
            event(1, "web", Some("m-1")),
            event(2, "web", Some("m-2")),
            event(3, "web", None),
            event(4, "web", Some("m-1")),
            event(5, "web", Some("m-1")),
        ])
        .unwrap();
    assert_eq!(
        messages(&store.minion_events("m-1", 10).unwrap()),
        ["at 1", "at 4", "at 5"]
    );
    assert_eq!(
        messages(&store.minion_events("m-1", 2).unwrap()),
        ["at 4", "at 5"]
    );
    assert!(store.minion_events("m-1", 0).unwrap().is_empty());
    assert!(store.minion_events("m-3", 10).unwrap().is_empty());
}

/// A prune deletes what is older and says how many; a sequence number is
/// never handed out again, even after a reopen.
pub fn prune_deletes_older_and_never_reuses_seqs<S: Store>(store: S, reopen: impl FnOnce() -> S) {
    store
        .append_events(&[
            event(1, "web", None),
            event(2, "web", None),
            event(3, "web", None),
        ])
        .unwrap();
    assert_eq!(store.prune_events(3).unwrap(), 2);
    assert_eq!(store.prune_events(3).unwrap(), 0);
    assert_eq!(
        messages(&store.events_since(i64::MIN, None, 10).unwrap()),
        ["at 3"]
    );
    assert_eq!(store.prune_events(4).unwrap(), 1);
    assert!(store.events_since(i64::MIN, None, 10).unwrap().is_empty());
    drop(store);

    let store = reopen();
    assert_eq!(store.append_events(&[event(5, "web", None)]).unwrap(), [4]);
}
