//! Sample rows for the tests of a [`Store`](super::Store) backend (the
//! SQLite store's unit tests, the DynamoDB store's tests on moto), so every
//! backend is checked with the same values, edge values included.

use super::{DrainRow, EventRow, FleetRow, HistoryRow, MinionRow, Origin, PinRow};

/// A minion in service, every optional field empty.
pub fn minion(id: &str) -> MinionRow {
    MinionRow {
        id: id.to_owned(),
        fleet: "web".to_owned(),
        instance: format!("i-{id}"),
        state: "InService".to_owned(),
        state_since_ms: 1_000,
        created_ms: 500,
        engine_address: None,
        registered: false,
        drain: None,
        launch_completed: false,
        termination_completed: false,
        hook_heartbeat_ms: None,
        deregistered_ms: None,
    }
}

/// A draining minion with every optional field set, to the extremes of
/// their types where that is allowed.
pub fn full_minion(id: &str) -> MinionRow {
    MinionRow {
        state: "Draining:Flushing".to_owned(),
        engine_address: Some("10.0.0.7:9000".to_owned()),
        registered: true,
        drain: Some(DrainRow {
            decrement: true,
            reason: "scale in: idle".to_owned(),
            overdue_reported: true,
        }),
        launch_completed: true,
        termination_completed: true,
        hook_heartbeat_ms: Some(-5),
        deregistered_ms: Some(i64::MAX),
        ..minion(id)
    }
}

/// A fleet paused and pinned, with policy memory.
/// A fleet's demand history as the controller writes it.
pub fn history(name: &str) -> HistoryRow {
    HistoryRow {
        name: name.to_owned(),
        history: r#"{"first":1764064800000,"means":[120.25,null,0.0]}"#.to_owned(),
    }
}

pub fn fleet(name: &str) -> FleetRow {
    FleetRow {
        name: name.to_owned(),
        paused: Some(Origin {
            by: "admin CN=alice".to_owned(),
            at_ms: 7,
        }),
        pin: Some(PinRow {
            desired: 3,
            until_ms: Some(9_000),
            origin: Origin {
                by: "gru dev".to_owned(),
                at_ms: 8,
            },
        }),
        policy_memory: r#"{"last":4}"#.to_owned(),
    }
}

/// A transition of `minion` (or of the fleet) at `at_ms`, its message
/// "at <at_ms>".
pub fn event(at_ms: i64, fleet: &str, minion: Option<&str>) -> EventRow {
    EventRow {
        seq: 0,
        at_ms,
        fleet: fleet.to_owned(),
        minion: minion.map(str::to_owned),
        kind: "transition".to_owned(),
        message: format!("at {at_ms}"),
        from: Some("Joining".to_owned()),
        to: Some("InService".to_owned()),
        actor: None,
    }
}
