//! The leader lease on moto's DynamoDB (conditional writes): acquire,
//! renew, take-over after a lease of silence and not before, release, and
//! a fenced write refused once the lease changed hands.
//!
//! Leases here are short (1 s) so the waits stay short; the waits are
//! conditions on the table with deadlines, not sleeps.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_dynamodb::types::{AttributeValue, Put, TransactWriteItem};
use gru_aws::dynamo::{self, Fence, Lease, LeaseError, LeaseRecord, Verdict};
use gru_aws::testing::{self, random_account};
use gru_controller::config::LeaderConfig;

use super::{TEST_TIMEOUT, moto};

const TABLE: &str = "gru-state";

async fn table() -> aws_sdk_dynamodb::Client {
    let client = testing::dynamodb_client(&moto().url, &random_account());
    dynamo::create_table(&client, TABLE)
        .await
        .expect("create table");
    client
}

fn config(name: &str, lease: Duration) -> LeaderConfig {
    LeaderConfig {
        name: name.to_owned(),
        advertise: format!("https://{name}:7070"),
        lease,
        heartbeat: lease / 4,
    }
}

fn lease(client: &aws_sdk_dynamodb::Client, name: &str, lease: Duration) -> (Arc<Lease>, Fence) {
    let fence = Fence::default();
    (
        Arc::new(Lease::new(
            client.clone(),
            TABLE,
            config(name, lease),
            fence.clone(),
        )),
        fence,
    )
}

/// A fenced write as the store makes them: a ConditionCheck on the lease's
/// term, then a Put. Returns whether it landed.
async fn fenced_put(client: &aws_sdk_dynamodb::Client, fence: &Fence, sk: &str) -> bool {
    let Some(check) = fence.check(TABLE) else {
        return false;
    };
    let put = Put::builder()
        .table_name(TABLE)
        .item("pk", AttributeValue::S("probe".into()))
        .item("sk", AttributeValue::S(sk.into()))
        .build()
        .expect("put");
    match client
        .transact_write_items()
        .transact_items(check)
        .transact_items(TransactWriteItem::builder().put(put).build())
        .send()
        .await
    {
        Ok(_) => true,
        Err(e) => {
            let e = e.into_service_error();
            assert!(
                e.is_transaction_canceled_exception(),
                "a fenced write fails only on its condition: {e:?}"
            );
            false
        }
    }
}

async fn probe_exists(client: &aws_sdk_dynamodb::Client, sk: &str) -> bool {
    client
        .get_item()
        .table_name(TABLE)
        .key("pk", AttributeValue::S("probe".into()))
        .key("sk", AttributeValue::S(sk.into()))
        .consistent_read(true)
        .send()
        .await
        .expect("get")
        .item
        .is_some()
}

#[tokio::test]
async fn the_first_controller_takes_a_free_lease_and_renews_it() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let client = table().await;
        let (a, fence) = lease(&client, "a", Duration::from_secs(15));
        assert_eq!(a.read().await.expect("read"), None);
        let term = a.acquire(|_, _| {}).await.expect("acquire");
        assert_eq!(term, 1);
        assert_eq!(fence.version(), 1);
        assert!(a.may_act());
        let first = a.read().await.expect("read").expect("the lease item");
        assert_eq!(
            (
                first.holder.as_str(),
                first.address.as_str(),
                first.term,
                first.released
            ),
            ("a", "https://a:7070", 1, false)
        );
        a.renew().await.expect("renew");
        a.renew().await.expect("renew");
        let renewed = a.read().await.expect("read").expect("the lease item");
        // A new version every renewal; the term (the fence) stays.
        assert_eq!(renewed.version, first.version + 2);
        assert_eq!(renewed.term, 1);
        assert!(fenced_put(&client, &fence, "after-renewals").await);
        assert!(probe_exists(&client, "after-renewals").await);
    })
    .await
    .expect("bounded");
}

#[tokio::test]
async fn a_renewed_lease_is_never_taken_and_a_silent_one_is_taken_after_one_lease() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let client = table().await;
        let span = Duration::from_secs(1);
        let (a, _) = lease(&client, "a", span);
        a.acquire(|_, _| {}).await.expect("a acquires");
        let holder = {
            let a = a.clone();
            tokio::spawn(async move { a.hold().await })
        };
        // b watches for three leases while a renews: it never takes it.
        let (b, b_fence) = lease(&client, "b", span);
        let mut verdicts = Vec::new();
        let mut challenger = {
            let b = b.clone();
            tokio::spawn(async move { b.acquire(move |_, v| verdicts.push(v)).await })
        };
        // Three leases of a renewing holder: the challenger must still be
        // waiting at the end of them.
        let watched = tokio::time::timeout(3 * span, &mut challenger).await;
        assert!(watched.is_err(), "b took a lease a renewed");
        assert_eq!(b_fence.version(), 0);
        assert!(a.may_act());

        // a goes silent (its process stopped): b takes over after one
        // lease of an unchanged version, as a new term.
        holder.abort();
        let started = tokio::time::Instant::now();
        let term = challenger.await.expect("join").expect("b acquires");
        let waited = started.elapsed();
        assert_eq!(term, 2);
        assert!(
            waited >= span.mul_f64(0.5),
            "b took the lease {waited:?} after a's last renewal could have been"
        );
        let now = b.read().await.expect("read").expect("item");
        assert_eq!((now.holder.as_str(), now.term), ("b", 2));
        assert!(b.may_act());
        // a cannot renew: the lease is b's.
        match a.renew().await {
            Err(LeaseError::Lost { by, .. }) => assert!(by.contains('b'), "{by}"),
            other => panic!("a renewed b's lease: {other:?}"),
        }
        assert!(!a.may_act());
    })
    .await
    .expect("bounded");
}

#[tokio::test]
async fn a_write_fenced_on_a_stale_term_is_refused_and_lands_nothing() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let client = table().await;
        let span = Duration::from_secs(1);
        let (a, a_fence) = lease(&client, "a", span);
        a.acquire(|_, _| {}).await.expect("a acquires");
        assert!(fenced_put(&client, &a_fence, "by-a-leading").await);

        // b takes over a silent a.
        let (b, b_fence) = lease(&client, "b", span);
        b.acquire(|_, _| {}).await.expect("b acquires");
        assert_eq!(b_fence.version(), a_fence.version() + 1);
        // a still believes its term (it was paused): its write is refused
        // by the table, and nothing of it lands.
        assert!(!fenced_put(&client, &a_fence, "by-a-deposed").await);
        assert!(!probe_exists(&client, "by-a-deposed").await);
        assert!(fenced_put(&client, &b_fence, "by-b").await);
        // And a controller that does not lead writes nothing at all.
        assert!(!fenced_put(&client, &Fence::default(), "by-nobody").await);
        assert!(!probe_exists(&client, "by-nobody").await);
    })
    .await
    .expect("bounded");
}

#[tokio::test]
async fn of_two_challengers_exactly_one_takes_the_lease() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let client = table().await;
        let span = Duration::from_secs(15);
        let (a, a_fence) = lease(&client, "a", span);
        let (b, b_fence) = lease(&client, "b", span);
        let (ra, rb) = tokio::join!(a.take(None), b.take(None));
        let (ra, rb) = (ra.expect("a"), rb.expect("b"));
        assert!(ra ^ rb, "both or neither took a free lease: a {ra}, b {rb}");
        assert_eq!(a_fence.version() + b_fence.version(), 1);
        // Both challenge the same observed record: one wins again.
        let seen: LeaseRecord = a.read().await.expect("read").expect("item");
        let (ra, rb) = tokio::join!(a.take(Some(&seen)), b.take(Some(&seen)));
        assert!(ra.expect("a") ^ rb.expect("b"));
    })
    .await
    .expect("bounded");
}

#[tokio::test]
async fn a_released_lease_is_taken_at_once() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let client = table().await;
        let span = Duration::from_secs(60);
        let (a, a_fence) = lease(&client, "a", span);
        a.acquire(|_, _| {}).await.expect("a acquires");
        a.release().await.expect("release");
        assert_eq!(a_fence.version(), 0);
        assert!(!a.may_act());
        let (b, _) = lease(&client, "b", span);
        let mut verdicts = Vec::new();
        // A 60 s lease, yet b takes it on its first read.
        let term =
            tokio::time::timeout(Duration::from_secs(10), b.acquire(|_, v| verdicts.push(v)))
                .await
                .expect("taken at once")
                .expect("b acquires");
        assert_eq!(term, 2);
        assert_eq!(verdicts, vec![Verdict::Free]);
    })
    .await
    .expect("bounded");
}
