//! A lock-free latency histogram with fixed buckets, cheap enough for every
//! message: the engine records how long each message took from its last
//! byte read to its ACK written, and the minion agent exports it as
//! `gru_engine_ack_duration_seconds`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, in seconds: half a millisecond to ten
/// seconds (an after-delivery ACK waits for the downstream).
pub const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Counts per bucket (not cumulative), the overflow, and the sum.
#[derive(Debug, Default)]
pub struct Latency {
    buckets: [AtomicU64; BUCKETS.len()],
    over: AtomicU64,
    sum_nanos: AtomicU64,
}

/// What a scrape reads: counts per bucket, as prometheus-client's encoders
/// take them (they accumulate).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LatencySnapshot {
    /// `(upper bound in seconds, observations above the previous bound and
    /// at or under this one)`, ascending, ending with `f64::INFINITY`.
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum_seconds: f64,
}

impl Latency {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        match BUCKETS.iter().position(|b| secs <= *b) {
            Some(i) => self.buckets[i].fetch_add(1, Ordering::Relaxed),
            None => self.over.fetch_add(1, Ordering::Relaxed),
        };
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> LatencySnapshot {
        let buckets: Vec<(f64, u64)> = BUCKETS
            .iter()
            .zip(&self.buckets)
            .map(|(bound, n)| (*bound, n.load(Ordering::Relaxed)))
            .chain([(f64::INFINITY, self.over.load(Ordering::Relaxed))])
            .collect();
        LatencySnapshot {
            count: buckets.iter().map(|(_, n)| n).sum(),
            buckets,
            sum_seconds: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_observation_lands_in_one_bucket_and_the_overflow_in_infinity() {
        let l = Latency::default();
        l.observe(Duration::from_micros(300)); // first bucket
        l.observe(Duration::from_micros(500)); // on a bound: that bucket
        l.observe(Duration::from_millis(3)); // 0.005
        l.observe(Duration::from_secs(60)); // over every bound
        let s = l.snapshot();
        assert_eq!(s.buckets[0], (0.0005, 2));
        assert_eq!(s.buckets[2], (0.0025, 0));
        assert_eq!(s.buckets[3], (0.005, 1));
        assert_eq!(s.buckets[BUCKETS.len() - 1], (10.0, 0));
        assert_eq!(s.buckets.last(), Some(&(f64::INFINITY, 1)));
        assert_eq!(s.count, 4);
        assert!((s.sum_seconds - 60.0038).abs() < 1e-9, "{}", s.sum_seconds);
    }
}
