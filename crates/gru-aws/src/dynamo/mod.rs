//! DynamoDB: the state several controllers share and the lease one of them
//! leads on, in one table (DESIGN.md "High availability").
//!
//! Start reading at [`Lease`] (who leads) and [`DynamoStore`] (the
//! controller's `Store` on the table). They share a [`Fence`]: the lease
//! term this controller holds, on which every store write is
//! conditioned, so a deposed leader's writes fail instead of landing.
//!
//! The table has a string partition key `pk` and a string sort key `sk`
//! (the CloudFormation stack's `StateTable`; [`create_table`] for tests):
//!
//! | pk         | sk                      | what                              |
//! |------------|-------------------------|-----------------------------------|
//! | `lease`    | `leader`                | the lease (see [`lease`])         |
//! | `meta`     | `schema`, `event-seq`   | schema version, next event seq    |
//! | `minion`   | minion id               | one minion row                    |
//! | `fleet`    | fleet name              | one fleet row                     |
//! | `history`  | fleet name              | one fleet's demand history        |
//! | `ledger`   | instance id             | one decrement claim               |
//! | `identity` | instance id             | one identity-document join        |
//! | `event`    | seq, 20 digits          | one event                         |
//! | `intent`   | fleet name              | the last cloud call it was about to make |
//!
//! Invariants:
//! - Every write but the lease's own is one TransactWriteItems whose first
//!   item is a ConditionCheck of the lease item's term against the
//!   [`Fence`]; a controller whose fence is 0 (not leading) writes nothing.
//! - Reads are strongly consistent.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, ConditionCheck, KeySchemaElement, KeyType,
    ScalarAttributeType, TransactWriteItem,
};

mod fenced;
pub mod lease;
mod store;

pub use fenced::fence_fleet;

pub use lease::{Lease, LeaseError, LeaseRecord, Verdict, Watch};
pub use store::DynamoStore;

/// The partition and sort key attributes.
pub const PK: &str = "pk";
pub const SK: &str = "sk";
/// The lease item's key.
pub const LEASE_PK: &str = "lease";
pub const LEASE_SK: &str = "leader";
/// The lease item's term attribute (a number): raised each time the lease
/// changes hands; what writes are fenced on (see [`lease`]).
pub const TERM: &str = "term";

/// The lease term this controller leads under; 0 while it does not.
/// Shared by the [`Lease`] (which sets it) and the [`DynamoStore`] (which
/// conditions every write on it).
#[derive(Clone, Debug, Default)]
pub struct Fence(Arc<AtomicU64>);

impl Fence {
    /// The term writes are conditioned on; 0 when not leading.
    pub fn version(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    /// Leads under term `version` (0: no longer).
    pub fn set(&self, version: u64) {
        self.0.store(version, Ordering::SeqCst)
    }

    /// The ConditionCheck that makes a transaction land only while the
    /// lease's term is still this one; `None` when not leading (write
    /// nothing).
    pub fn check(&self, table: &str) -> Option<TransactWriteItem> {
        let version = self.version();
        if version == 0 {
            return None;
        }
        let check = ConditionCheck::builder()
            .table_name(table)
            .key(PK, AttributeValue::S(LEASE_PK.to_owned()))
            .key(SK, AttributeValue::S(LEASE_SK.to_owned()))
            .condition_expression("#v = :v")
            .expression_attribute_names("#v", TERM)
            .expression_attribute_values(":v", AttributeValue::N(version.to_string()))
            .build()
            .expect("key, table and condition are set");
        Some(TransactWriteItem::builder().condition_check(check).build())
    }
}

/// Creates the table as the CloudFormation stack does (on-demand), for
/// tests and for a first try without the stack. Waits until it is active.
pub async fn create_table(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
) -> Result<(), aws_sdk_dynamodb::Error> {
    let key = |name: &str, kind| {
        KeySchemaElement::builder()
            .attribute_name(name)
            .key_type(kind)
            .build()
            .expect("name and type are set")
    };
    let attribute = |name: &str| {
        AttributeDefinition::builder()
            .attribute_name(name)
            .attribute_type(ScalarAttributeType::S)
            .build()
            .expect("name and type are set")
    };
    client
        .create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest)
        .key_schema(key(PK, KeyType::Hash))
        .key_schema(key(SK, KeyType::Range))
        .attribute_definitions(attribute(PK))
        .attribute_definitions(attribute(SK))
        .send()
        .await?;
    Ok(())
}

/// A DynamoDB client from the default credential chain, in `region`, at
/// `endpoint_url` when given (moto, a VPC endpoint).
pub async fn client(region: &str, endpoint_url: Option<&str>) -> aws_sdk_dynamodb::Client {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(crate::config::https_client())
        .region(aws_config::Region::new(region.to_owned()));
    if let Some(url) = endpoint_url {
        loader = loader.endpoint_url(url);
    }
    aws_sdk_dynamodb::Client::new(&loader.load().await)
}
