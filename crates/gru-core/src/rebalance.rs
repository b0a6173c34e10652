//! Spreading long-lived connections onto new minions (DESIGN.md, "Long-lived
//! connections and scale-out").
//!
//! A load balancer spreads connections, not messages, and senders hold
//! theirs for hours: a minion that goes in service gets work only as
//! senders reconnect. [`rebalance`] decides which minions to ask to close
//! some of their connections (at message boundaries, as a drain does) so
//! their senders reconnect through the load balancer, onto the minions
//! below their share. Pure: the shell turns each [`Shed`] into a Session
//! command.
//!
//! Bounds, property-tested below: a minion is never asked to drop below its
//! fair share in whole connections (the total divided by the holders,
//! rounded down); no more than
//! `max_fraction` of the fleet's connections, and no more than the holders
//! below their share can take, are shed in one pass; a minion asked
//! recently (within `cooldown`, long enough for its reports to show the
//! effect) or whose engine cannot shed is left alone.

use std::time::Duration;

/// How eagerly a fleet's connections are spread.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RebalanceLimits {
    /// Imbalance left alone: a minion sheds onto the emptiest one only when
    /// they differ by more than one connection plus this.
    pub tolerance: u64,
    /// The largest part of the fleet's connections shed in one pass, in
    /// `(0, 1]`; at least one connection when anything is to be shed.
    pub max_fraction: f64,
    /// A minion asked to shed is not asked again within this.
    pub cooldown: Duration,
}

/// The defaults: one connection of slack, at most half the fleet's
/// connections per pass, 2 s between asks of the same minion (two report
/// intervals: the next ask sees what the last one did).
pub const DEFAULT_REBALANCE: RebalanceLimits = RebalanceLimits {
    tolerance: 1,
    max_fraction: 0.5,
    cooldown: Duration::from_secs(2),
};

/// An in-service minion as the rebalancer sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holder<'a> {
    pub id: &'a str,
    /// Open connections, as last reported.
    pub connections: u64,
    /// Its engine closes connections when asked.
    pub can_shed: bool,
    /// Since it was last asked to shed.
    pub since_shed: Option<Duration>,
}

/// Ask `id` to close `count` of its `connections`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shed {
    pub id: String,
    pub count: u64,
    pub connections: u64,
    /// The fair share (rounded down) it keeps at least.
    pub share: u64,
    /// In-service minions the share is over.
    pub holders: usize,
}

/// Which holders shed how many connections this pass. Nothing when fewer
/// than two minions are in service, or when none is below its share (the
/// total over the holders, rounded down).
pub fn rebalance(holders: &[Holder], limits: &RebalanceLimits) -> Vec<Shed> {
    let n = holders.len() as u64;
    if n < 2 {
        return Vec::new();
    }
    let total: u64 = holders.iter().map(|h| h.connections).sum();
    let floor = total / n;
    // What the minions below their share can take, and the emptiest.
    let emptiest = holders.iter().map(|h| h.connections).min().unwrap_or(0);
    let room: u64 = holders
        .iter()
        .filter(|h| h.connections < floor)
        .map(|h| floor - h.connections)
        .sum();
    if room == 0 {
        return Vec::new();
    }
    let fraction = limits.max_fraction.clamp(0.0, 1.0);
    let mut budget = ((total as f64 * fraction).floor() as u64).max(1).min(room);
    let mut over: Vec<&Holder> = holders
        .iter()
        .filter(|h| {
            h.can_shed
                && h.connections > floor
                && h.connections - emptiest > 1 + limits.tolerance
                && h.since_shed.is_none_or(|d| d >= limits.cooldown)
        })
        .collect();
    // The most overloaded first; ties by id, so a plan is reproducible.
    over.sort_by(|a, b| {
        b.connections
            .cmp(&a.connections)
            .then_with(|| a.id.cmp(b.id))
    });
    let mut sheds = Vec::new();
    for h in over {
        if budget == 0 {
            break;
        }
        let count = (h.connections - floor).min(budget);
        budget -= count;
        sheds.push(Shed {
            id: h.id.to_owned(),
            count,
            connections: h.connections,
            share: floor,
            holders: holders.len(),
        });
    }
    sheds
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn holders(connections: &[u64]) -> Vec<Holder<'static>> {
        const IDS: [&str; 8] = ["m-0", "m-1", "m-2", "m-3", "m-4", "m-5", "m-6", "m-7"];
        connections
            .iter()
            .zip(IDS)
            .map(|(&connections, id)| Holder {
                id,
                connections,
                can_shed: true,
                since_shed: None,
            })
            .collect()
    }

    #[test]
    fn a_new_minion_gets_half_of_the_one_that_holds_them_all() {
        let sheds = rebalance(&holders(&[16, 0]), &DEFAULT_REBALANCE);
        assert_eq!(
            sheds,
            vec![Shed {
                id: "m-0".to_owned(),
                count: 8,
                connections: 16,
                share: 8,
                holders: 2,
            }]
        );
    }

    #[test]
    fn sixteen_over_five_sheds_down_to_four_each_within_the_budget() {
        // 16 on one minion, four new ones: share 3.2, rounded up 4; half of
        // the fleet's 16 connections per pass.
        let sheds = rebalance(&holders(&[16, 0, 0, 0, 0]), &DEFAULT_REBALANCE);
        assert_eq!(sheds.len(), 1);
        assert_eq!(sheds[0].count, 8);
        // Every minion at 4 but a new one: three of them give one each.
        let sheds = rebalance(&holders(&[4, 4, 4, 4, 0]), &DEFAULT_REBALANCE);
        assert_eq!(
            sheds.iter().map(|s| s.count).collect::<Vec<_>>(),
            [1, 1, 1],
            "{sheds:?}"
        );
        // The next pass, once the first ask's effect shows: 8 left, 8 spread;
        // the four below 3 take one each.
        let mut next = holders(&[8, 2, 2, 2, 2]);
        next[0].since_shed = Some(DEFAULT_REBALANCE.cooldown);
        let sheds = rebalance(&next, &DEFAULT_REBALANCE);
        assert_eq!(sheds[0].count, 4, "4 of the room of 4: {sheds:?}");
        let mut next = holders(&[8, 4, 4, 0, 0]);
        next[0].since_shed = Some(DEFAULT_REBALANCE.cooldown);
        let sheds = rebalance(&next, &DEFAULT_REBALANCE);
        assert_eq!(sheds[0].count, 5, "down to the share of 3: {sheds:?}");
        // Within the tolerance: left alone.
        assert_eq!(
            rebalance(&holders(&[5, 4, 4, 3]), &DEFAULT_REBALANCE),
            Vec::new()
        );
    }

    #[test]
    fn a_balanced_fleet_a_single_minion_and_no_connections_shed_nothing() {
        for c in [&[5, 4, 4, 3][..], &[16], &[0, 0, 0], &[2, 1, 0]] {
            assert_eq!(
                rebalance(&holders(c), &DEFAULT_REBALANCE),
                Vec::new(),
                "{c:?}"
            );
        }
    }

    #[test]
    fn a_minion_in_its_cooldown_or_that_cannot_shed_is_left_alone() {
        let mut h = holders(&[16, 0]);
        h[0].since_shed = Some(Duration::from_secs(1));
        assert_eq!(rebalance(&h, &DEFAULT_REBALANCE), Vec::new());
        let mut h = holders(&[16, 0]);
        h[0].can_shed = false;
        assert_eq!(rebalance(&h, &DEFAULT_REBALANCE), Vec::new());
    }

    proptest! {
        #[test]
        fn sheds_stay_within_their_bounds(
            connections in prop::collection::vec(0u64..200, 0..8),
            cannot in prop::collection::vec(any::<bool>(), 8),
            asked in prop::collection::vec(prop::option::of(0u64..10), 8),
            tolerance in 0u64..4,
            max_fraction in 0.01f64..=1.0,
        ) {
            let mut h = holders(&connections);
            for (i, holder) in h.iter_mut().enumerate() {
                holder.can_shed = !cannot[i];
                holder.since_shed = asked[i].map(Duration::from_secs);
            }
            let limits = RebalanceLimits {
                tolerance,
                max_fraction,
                cooldown: Duration::from_secs(5),
            };
            let sheds = rebalance(&h, &limits);
            let total: u64 = connections.iter().sum();
            let n = connections.len() as u64;
            let shed: u64 = sheds.iter().map(|s| s.count).sum();
            if !sheds.is_empty() {
                let room: u64 = connections
                    .iter()
                    .filter(|&&c| c < total / n)
                    .map(|&c| total / n - c)
                    .sum();
                prop_assert!(shed <= ((total as f64 * max_fraction) as u64).max(1));
                prop_assert!(shed <= room, "more than the minions below their share take");
            }
            for s in &sheds {
                let holder = h.iter().find(|x| x.id == s.id).expect("a holder");
                prop_assert!(s.count > 0);
                prop_assert!(holder.can_shed);
                prop_assert!(holder.since_shed.is_none_or(|d| d >= limits.cooldown));
                // Never below its share: it keeps at least total / n,
                // rounded down.
                let kept = holder.connections - s.count;
                prop_assert!(kept >= total / n, "{kept} kept of {total} over {n}");
                let emptiest = connections.iter().min().copied().unwrap_or(0);
                prop_assert!(holder.connections - emptiest > 1 + tolerance, "within the tolerance");
            }
            let ids: std::collections::BTreeSet<_> = sheds.iter().map(|s| &s.id).collect();
            prop_assert_eq!(ids.len(), sheds.len(), "one ask per minion");
        }
    }
}
