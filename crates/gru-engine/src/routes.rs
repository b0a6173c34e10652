//! Routes, ACK modes, and the example topologies of the origin's benchmark.
//!
//! Each inbound message goes down every route; a route optionally transforms
//! it ([`Transform`]) and sends the result to each of its destinations. With
//! no routes configured the engine has one implicit route: no transform, to
//! `EngineConfig::downstream` (T1, plain pass-through).
//!
//! These types derive serde so the minion config can carry them, e.g.
//!
//! ```toml
//! ack_mode = "after-enqueue"
//! [[routes]]
//! name = "adt"
//! destinations = ["10.0.0.5:2576", "10.0.0.6:2576"]
//! transform = [
//!   { op = "set", path = "MSH-4", value = "GRU" },
//!   { op = "drop-segments", segment = "NTE" },
//! ]
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::transform::{HlPath, Step, Transform};

/// When the sender gets its ACK.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AckMode {
    /// AA only once every destination ACKed (AE once one gave up).
    #[default]
    AfterDelivery,
    /// AA once the message is queued (and written to the durable queue when
    /// one is configured); delivery failures after that are counted and
    /// logged, not sent upstream.
    AfterEnqueue,
    /// No ACK at all: the no-ACK workload. Senders do not wait.
    None,
}

impl std::fmt::Display for AckMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AckMode::AfterDelivery => "after-delivery",
            AckMode::AfterEnqueue => "after-enqueue",
            AckMode::None => "none",
        })
    }
}

/// One route: an optional transform and one or more destinations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// For logs and spans.
    pub name: String,
    /// Applied to a copy of the message for this route only; absent or empty
    /// = the MSH-only fast path.
    #[serde(default)]
    pub transform: Option<Transform>,
    /// Each gets the (transformed) message over its own MLLP connections.
    pub destinations: Vec<SocketAddr>,
}

impl Route {
    /// A route without transform.
    pub fn pass_through(name: &str, destinations: Vec<SocketAddr>) -> Self {
        Route {
            name: name.to_owned(),
            transform: None,
            destinations,
        }
    }

    /// The transform, if it has any steps.
    pub fn active_transform(&self) -> Option<&Transform> {
        self.transform.as_ref().filter(|t| !t.is_empty())
    }
}

fn path(s: &str) -> HlPath {
    // Only called with the literals below.
    s.parse().expect("example paths are valid")
}

/// The transform the example topologies use: stamp the receiving facility,
/// keep only the family name, map sex codes, drop notes.
pub fn example_transform(facility: &str) -> Transform {
    let sex: BTreeMap<String, String> = [("F", "female"), ("M", "male"), ("U", "unknown")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    Transform::new(vec![
        Step::Set {
            path: path("MSH-6"),
            value: facility.to_owned(),
        },
        Step::Copy {
            from: path("MSH-4"),
            to: path("MSH-3"),
        },
        Step::Map {
            path: path("PID-8"),
            table: sex,
            default: Some("other".to_owned()),
        },
        Step::Clear {
            path: path("PID-5.2"),
        },
        Step::DropSegments {
            segment: "NTE".to_owned(),
        },
    ])
}

/// T2, "1-1-2 with transform": one route, one transform, two destinations.
pub fn t2_routes(destinations: [SocketAddr; 2]) -> Vec<Route> {
    vec![Route {
        name: "t2".to_owned(),
        transform: Some(example_transform("T2")),
        destinations: destinations.to_vec(),
    }]
}

/// T4, "1-4-5 with transform": four routes, each with its own transform,
/// five destinations (the last route fans out to two).
pub fn t4_routes(destinations: [SocketAddr; 5]) -> Vec<Route> {
    (0..4)
        .map(|i| Route {
            name: format!("t4-{}", i + 1),
            transform: Some(example_transform(&format!("T4R{}", i + 1))),
            destinations: if i < 3 {
                vec![destinations[i]]
            } else {
                destinations[3..].to_vec()
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Section {
        #[serde(default)]
        ack_mode: AckMode,
        routes: Vec<Route>,
    }

    #[test]
    fn routes_deserialize_from_toml() {
        let text = r#"
            ack_mode = "after-enqueue"
            [[routes]]
            name = "adt"
            destinations = ["127.0.0.1:2576", "127.0.0.1:2577"]
            transform = [
              { op = "set", path = "MSH-4", value = "GRU" },
              { op = "copy", from = "MSH-3", to = "PID-5.2" },
              { op = "clear", path = "PID-7" },
              { op = "map", path = "PID-8", table = { F = "female" }, default = "other" },
              { op = "drop-segments", segment = "NTE" },
            ]
            [[routes]]
            name = "plain"
            destinations = ["127.0.0.1:2578"]
        "#;
        let s: Section = toml::from_str(text).expect("toml");
        assert_eq!(s.ack_mode, AckMode::AfterEnqueue);
        assert_eq!(s.routes.len(), 2);
        let t = s.routes[0].active_transform().expect("transform");
        assert_eq!(t.steps.len(), 5);
        t.validate().expect("valid");
        assert!(s.routes[1].active_transform().is_none());
        let bad = r#"
            [[routes]]
            name = "x"
            destinations = []
            transform = [{ op = "set", path = "PID5", value = "x" }]
        "#;
        let err = toml::from_str::<Section>(bad)
            .err()
            .expect("bad path refused");
        assert!(err.to_string().contains("PID5"), "{err}");
    }

    #[test]
    fn example_topologies_have_the_right_shape() {
        let a: Vec<SocketAddr> = (0..5)
            .map(|i| SocketAddr::from(([127, 0, 0, 1], 3000 + i)))
            .collect();
        let t2 = t2_routes([a[0], a[1]]);
        assert_eq!(t2.len(), 1);
        assert_eq!(t2[0].destinations.len(), 2);
        let t4 = t4_routes([a[0], a[1], a[2], a[3], a[4]]);
        assert_eq!(t4.len(), 4);
        let dests: Vec<_> = t4.iter().flat_map(|r| r.destinations.clone()).collect();
        assert_eq!(dests, a);
        for r in t2.iter().chain(&t4) {
            r.active_transform()
                .expect("transform")
                .validate()
                .expect("valid");
        }
        let round_trip: Vec<Route> =
            serde_json::from_str(&serde_json::to_string(&t4).expect("json")).expect("json");
        assert_eq!(round_trip, t4);
    }
}
