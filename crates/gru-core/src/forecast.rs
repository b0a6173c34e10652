//! A fleet's demand history and the seasonal forecast made from it.
//!
//! [`DemandHistory`] keeps the arrival rate the policy estimated at each
//! evaluation, averaged per minute, and of each [`BUCKET`] the busiest
//! minute (a climb within a bucket is remembered at its top, not its
//! middle: capacity launched for it must serve the top), for [`KEEP`] (a week
//! and a day, so "the same time last week" is there for the whole of the
//! next day). [`DemandHistory::forecast`] predicts the rate over a span of
//! time ahead from two seasons, each scaled by its recent level:
//!
//! - **seasons**: the bucket one day earlier and the bucket one week
//!   earlier;
//! - **level**, per season: how the rate arriving lately compares with what
//!   that season said for it, as a ratio of exponentially weighted sums
//!   (time constant [`LEVEL_TIME`]), clamped to [[`MIN_LEVEL`],
//!   [`MAX_LEVEL`]]: a day running 20 % above yesterday is forecast 20 %
//!   above yesterday for the rest of it, and a step change is followed
//!   within minutes.
//!
//! The forecast is the higher of the two scaled seasons (a Monday morning
//! is forecast from last Monday's, which matched the night, not from
//! Sunday's; a Saturday's from last Saturday's once Friday's level has
//! fallen: a forecast only ever launches, so erring high costs idle minutes
//! and erring low costs waiting work), at the highest bucket of the span
//! (a launch made for it must serve the whole span). Nothing here reads a
//! clock.

use std::collections::VecDeque;
use std::time::Duration;

use jiff::Timestamp;

/// The history's resolution.
pub const BUCKET: Duration = Duration::from_secs(5 * 60);
/// How much history is kept.
pub const KEEP: Duration = Duration::from_secs(8 * 24 * 3600);
/// How fast the level follows the rate arriving now.
pub const LEVEL_TIME: Duration = Duration::from_secs(60);
pub const MIN_LEVEL: f64 = 0.05;
pub const MAX_LEVEL: f64 = 4.0;

const DAY_S: i64 = 24 * 3600;
const WEEK_S: i64 = 7 * DAY_S;

fn bucket_s() -> i64 {
    BUCKET.as_secs() as i64
}

fn keep_buckets() -> usize {
    (KEEP.as_secs() / BUCKET.as_secs()) as usize
}

/// Index of the bucket holding `t` (seconds since the epoch / BUCKET).
fn index(t: Timestamp) -> i64 {
    t.as_second().div_euclid(bucket_s())
}

/// Exponentially weighted sums of the rate seen and of what the seasons
/// said for the same moments.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Level {
    at: Timestamp,
    actual: f64,
    seasonal: f64,
}

/// Arrival rates over the last [`KEEP`], in [`BUCKET`]s.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DemandHistory {
    /// Index of `buckets[0]`.
    first: i64,
    /// The busiest minute's mean rate per bucket, oldest first; `None`
    /// where nothing was recorded.
    buckets: VecDeque<Option<f64>>,
    /// The minute being recorded: (unix minute, sum of rates, how many).
    minute: Option<(i64, f64, u32)>,
    /// Per season: one day back, one week back.
    levels: [Option<Level>; 2],
}

/// The seasons one bucket was forecast from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Seasons {
    /// The bucket's start.
    pub at: Timestamp,
    /// The mean rate one day earlier.
    pub day: Option<f64>,
    /// The mean rate one week earlier.
    pub week: Option<f64>,
}

impl Seasons {
    fn get(&self, season: usize) -> Option<f64> {
        [self.day, self.week][season]
    }
}

/// A forecast over a span of time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Forecast {
    /// Messages per second expected at the busiest bucket of the span.
    pub rate: f64,
    /// That bucket's seasons.
    pub seasons: Seasons,
    /// The recent level of each season (1.0: as it said), one day back
    /// and one week back.
    pub levels: [f64; 2],
}

/// Why there is no forecast.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoForecast {
    /// The history covers `have` of the `need` required before forecasting.
    TooLittleHistory { have: Duration, need: Duration },
    /// Neither season has a record for the span (e.g. the fleet was off).
    NoSeason,
}

impl std::fmt::Display for NoForecast {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoForecast::TooLittleHistory { have, need } => write!(
                f,
                "history covers {} of the {} needed",
                crate::policy::duration_text(*have),
                crate::policy::duration_text(*need)
            ),
            NoForecast::NoSeason => {
                write!(f, "no history one day or one week before the span")
            }
        }
    }
}

/// [`DemandHistory`] as plain values, for a store: each bucket's busiest
/// finished minute's mean (`None` where nothing was recorded). The minute
/// being recorded is not kept; the newest bucket keeps taking minutes
/// after a restore.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HistoryMemory {
    /// The first bucket's start.
    pub first: Option<Timestamp>,
    pub means: Vec<Option<f64>>,
}

impl DemandHistory {
    pub fn new() -> Self {
        DemandHistory::default()
    }

    fn last(&self) -> Option<i64> {
        (!self.buckets.is_empty()).then(|| self.first + self.buckets.len() as i64 - 1)
    }

    fn mean(&self, idx: i64) -> Option<f64> {
        let i = usize::try_from(idx - self.first).ok()?;
        *self.buckets.get(i)?
    }

    /// What the seasons say for the bucket holding `t`.
    pub fn seasons(&self, t: Timestamp) -> Seasons {
        let idx = index(t);
        Seasons {
            at: Timestamp::from_second(idx * bucket_s()).unwrap_or(t),
            day: self.mean(idx - DAY_S / bucket_s()),
            week: self.mean(idx - WEEK_S / bucket_s()),
        }
    }

    /// How long the history reaches back from `now`.
    pub fn span(&self, now: Timestamp) -> Duration {
        if self.buckets.is_empty() {
            return Duration::ZERO;
        }
        let secs = now.as_second() - self.first * bucket_s();
        Duration::from_secs(u64::try_from(secs).unwrap_or(0))
    }

    /// Records `rate` (messages per second arriving) at `now`. A time
    /// before the minute being recorded (the clock stepped back) counts
    /// into that minute; a gap longer than the history keeps starts it
    /// afresh.
    pub fn record(&mut self, now: Timestamp, rate: f64) {
        if !rate.is_finite() || rate < 0.0 {
            return;
        }
        self.follow_level(now, rate);
        let minute = now.as_second().div_euclid(60);
        self.minute = Some(match self.minute {
            Some((m, sum, n)) if minute <= m => (m, sum + rate, n + 1),
            Some((m, sum, n)) => {
                self.fold(m, sum / f64::from(n));
                (minute, rate, 1)
            }
            None => (minute, rate, 1),
        });
    }

    /// Counts a finished minute's mean into its bucket.
    fn fold(&mut self, minute: i64, mean: f64) {
        let idx = (minute * 60).div_euclid(bucket_s());
        match self.last() {
            None => self.first = idx,
            Some(last) if idx - last > keep_buckets() as i64 => {
                self.buckets.clear();
                self.first = idx;
            }
            Some(last) if idx < last => return,
            Some(_) => {}
        }
        while self.last().is_none_or(|last| last < idx) {
            self.buckets.push_back(None);
        }
        if let Some(b) = self.buckets.back_mut() {
            *b = Some(b.map_or(mean, |v| v.max(mean)));
        }
        while self.buckets.len() > keep_buckets() {
            self.buckets.pop_front();
            self.first += 1;
        }
    }

    fn follow_level(&mut self, now: Timestamp, rate: f64) {
        let seasons = self.seasons(now);
        for (season, level) in self.levels.iter_mut().enumerate() {
            let Some(seasonal) = seasons.get(season) else {
                continue;
            };
            *level = Some(match *level {
                Some(l) => {
                    let dt = (now.as_millisecond() - l.at.as_millisecond()).max(0) as f64 / 1000.0;
                    let d = (-dt / LEVEL_TIME.as_secs_f64()).exp();
                    Level {
                        at: now,
                        actual: l.actual * d + rate,
                        seasonal: l.seasonal * d + seasonal,
                    }
                }
                None => Level {
                    at: now,
                    actual: rate,
                    seasonal,
                },
            });
        }
    }

    /// Each season's recent level: the rate seen lately over what it said
    /// (one day back, one week back; 1.0 while unknown).
    pub fn levels(&self) -> [f64; 2] {
        self.levels.map(|l| match l {
            Some(l) if l.seasonal > 1e-9 => (l.actual / l.seasonal).clamp(MIN_LEVEL, MAX_LEVEL),
            Some(l) if l.actual > 1e-9 => MAX_LEVEL,
            _ => 1.0,
        })
    }

    /// The rate expected over `from..=to`, once the history reaches back
    /// `min_history` from `now`.
    pub fn forecast(
        &self,
        now: Timestamp,
        from: Timestamp,
        to: Timestamp,
        min_history: Duration,
    ) -> Result<Forecast, NoForecast> {
        let have = self.span(now);
        if have < min_history {
            return Err(NoForecast::TooLittleHistory {
                have,
                need: min_history,
            });
        }
        let levels = self.levels();
        let mut best: Option<(f64, Seasons)> = None;
        for idx in index(from)..=index(to).max(index(from)) {
            let at = Timestamp::from_second(idx * bucket_s()).unwrap_or(from);
            let s = self.seasons(at);
            for (season, level) in levels.iter().enumerate() {
                if let Some(v) = s.get(season).map(|v| v * level)
                    && best.is_none_or(|(b, _)| v > b)
                {
                    best = Some((v, s));
                }
            }
        }
        let (rate, seasons) = best.ok_or(NoForecast::NoSeason)?;
        Ok(Forecast {
            rate,
            seasons,
            levels,
        })
    }

    /// The history as plain values.
    pub fn memory(&self) -> HistoryMemory {
        HistoryMemory {
            first: (!self.buckets.is_empty())
                .then(|| Timestamp::from_second(self.first * bucket_s()).ok())
                .flatten(),
            means: self.buckets.iter().copied().collect(),
        }
    }

    /// A history from what [`DemandHistory::memory`] gave; a memory longer
    /// than [`KEEP`] keeps its newest part.
    pub fn from_memory(memory: &HistoryMemory) -> Self {
        let Some(first) = memory.first else {
            return DemandHistory::default();
        };
        let mut h = DemandHistory {
            first: index(first),
            buckets: memory
                .means
                .iter()
                .map(|m| m.filter(|v| v.is_finite() && *v >= 0.0))
                .collect(),
            minute: None,
            levels: [None; 2],
        };
        while h.buckets.len() > keep_buckets() {
            h.buckets.pop_front();
            h.first += 1;
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t0() -> Timestamp {
        "2026-11-02T00:00:00Z".parse().unwrap()
    }

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(t0().as_second() + secs).unwrap()
    }

    /// A daily wave between 100 and 500 msg/s, peaking at noon.
    fn daily(secs: i64) -> f64 {
        let phase = (secs.rem_euclid(DAY_S)) as f64 / DAY_S as f64;
        300.0 - 200.0 * (2.0 * std::f64::consts::PI * phase).cos()
    }

    fn fill(h: &mut DemandHistory, from: i64, to: i64, step: i64, f: impl Fn(i64) -> f64) {
        let mut s = from;
        while s < to {
            h.record(at(s), f(s));
            s += step;
        }
    }

    const HORIZON: Duration = Duration::from_secs(130);

    #[test]
    fn no_forecast_before_the_minimum_history() {
        let mut h = DemandHistory::new();
        fill(&mut h, 0, 3 * 3600, 10, daily);
        let now = at(3 * 3600);
        let err = h
            .forecast(now, now, at(3 * 3600 + 130), Duration::from_secs(24 * 3600))
            .unwrap_err();
        assert_eq!(
            err,
            NoForecast::TooLittleHistory {
                have: Duration::from_secs(3 * 3600),
                need: Duration::from_secs(24 * 3600)
            }
        );
        assert_eq!(err.to_string(), "history covers 3h of the 24h needed");
    }

    #[test]
    fn a_periodic_series_is_forecast_within_tolerance() {
        let mut h = DemandHistory::new();
        // Three days, one report every 10 s; then forecast every 20
        // minutes of the fourth day one boot plus one evaluation ahead.
        let days = 3 * DAY_S;
        fill(&mut h, 0, days, 10, daily);
        let mut s = days;
        while s < days + DAY_S {
            let now = at(s);
            let to = at(s + HORIZON.as_secs() as i64);
            let f = h
                .forecast(now, now, to, Duration::from_secs(24 * 3600))
                .unwrap();
            // The truth: the highest rate over the same span.
            let truth = (s..=s + HORIZON.as_secs() as i64)
                .step_by(10)
                .map(daily)
                .fold(0.0, f64::max);
            let err = (f.rate - truth).abs() / truth;
            assert!(
                err < 0.05,
                "at +{s}s: forecast {:.1}, truth {truth:.1} ({:.1} %)",
                f.rate,
                err * 100.0
            );
            fill(&mut h, s, s + 1200, 10, daily);
            s += 1200;
        }
    }

    #[test]
    fn a_step_change_is_followed_within_the_horizon() {
        let mut h = DemandHistory::new();
        let days = 2 * DAY_S;
        fill(&mut h, 0, days, 10, daily);
        // From here the fleet gets twice what the seasons say.
        let step = days + 10 * 3600;
        fill(&mut h, days, step, 10, daily);
        let double = |s: i64| 2.0 * daily(s);
        let horizon = HORIZON.as_secs() as i64;
        // At the step the forecast still says one times.
        let before = h
            .forecast(at(step), at(step), at(step + horizon), Duration::ZERO)
            .unwrap();
        assert!(before.levels[0] < 1.05, "{before:?}");
        // One horizon after it, at least 1.8 times; three, within 5 % of 2.
        fill(&mut h, step, step + horizon, 10, double);
        let now = step + horizon;
        let one = h
            .forecast(at(now), at(now), at(now + horizon), Duration::ZERO)
            .unwrap();
        assert!(one.levels[0] > 1.8, "{one:?}");
        fill(&mut h, now, step + 3 * horizon, 10, double);
        let now = step + 3 * horizon;
        let three = h
            .forecast(at(now), at(now), at(now + horizon), Duration::ZERO)
            .unwrap();
        assert!((three.levels[0] - 2.0).abs() < 0.1, "{three:?}");
        let truth = double(now + horizon);
        assert!(
            (three.rate - truth).abs() / truth < 0.05,
            "{three:?} vs {truth}"
        );
    }

    /// 1,000 msg/s on weekdays 07:00–17:00, 100 otherwise.
    fn office(secs: i64) -> f64 {
        let day = secs.div_euclid(DAY_S) % 7;
        let hour = secs.rem_euclid(DAY_S) / 3600;
        if day < 5 && (7..17).contains(&hour) {
            1000.0
        } else {
            100.0
        }
    }

    #[test]
    fn the_higher_scaled_season_counts_and_a_missing_season_is_said() {
        let mut h = DemandHistory::new();
        fill(&mut h, 0, WEEK_S + 6 * 3600 + 58 * 60, 60, office);
        // Monday of the second week, 06:58: yesterday (a Sunday) says 100
        // for 07:00, last Monday 1,000; both matched the night.
        let now = at(WEEK_S + 6 * 3600 + 58 * 60);
        let seven = at(WEEK_S + 7 * 3600);
        let f = h.forecast(now, seven, seven, Duration::ZERO).unwrap();
        assert_eq!((f.seasons.day, f.seasons.week), (Some(100.0), Some(1000.0)));
        assert!((f.rate - 1000.0).abs() < 1.0, "{f:?}");
        // Far in the future nothing is known.
        let far = at(30 * DAY_S);
        assert_eq!(
            h.forecast(now, far, far, Duration::ZERO),
            Err(NoForecast::NoSeason)
        );
    }

    #[test]
    fn a_climb_within_a_bucket_is_remembered_at_its_top() {
        let mut h = DemandHistory::new();
        fill(&mut h, 0, DAY_S, 10, |_| 50.0);
        // 07:00: three minutes at 50 then 1,000 (a shift starts); the next
        // morning the 07:00 bucket is forecast at 1,000, not its mean 430.
        let seven = 7 * 3600;
        fill(&mut h, DAY_S + seven - 600, DAY_S + seven + 1800, 10, |s| {
            if s < DAY_S + seven + 180 {
                50.0
            } else {
                1000.0
            }
        });
        let next = at(2 * DAY_S + seven);
        assert_eq!(h.seasons(next).day, Some(1000.0));
        // The minutes before it stayed at the floor.
        assert_eq!(h.seasons(at(2 * DAY_S + seven - 300)).day, Some(50.0));
    }

    #[test]
    fn history_is_bounded_and_survives_its_memory() {
        let mut h = DemandHistory::new();
        fill(&mut h, 0, 10 * DAY_S, 60, daily);
        assert_eq!(h.buckets.len(), keep_buckets());
        assert_eq!(h.span(at(10 * DAY_S)), KEEP);
        let m = h.memory();
        assert_eq!(m.means.len(), keep_buckets());
        let back = DemandHistory::from_memory(&m);
        // A round trip keeps everything, however often it is made.
        assert_eq!(back.memory(), m);
        assert_eq!(DemandHistory::from_memory(&back.memory()).memory(), m);
        let probe = at(10 * DAY_S + 300);
        assert_eq!(back.seasons(probe), h.seasons(probe));
        // A gap longer than the history starts afresh.
        let mut g = back.clone();
        g.record(at(40 * DAY_S), 5.0);
        g.record(at(40 * DAY_S + 60), 5.0);
        assert_eq!(g.buckets.len(), 1);
        assert_eq!(DemandHistory::new().memory(), HistoryMemory::default());
    }

    proptest! {
        /// Whatever is recorded, in whatever order, the history stays
        /// within its bound and forecasts are finite and non-negative.
        #[test]
        fn bounded_and_finite(steps in proptest::collection::vec((-600i64..4 * 3600, 0.0f64..1e6), 1..300)) {
            let mut h = DemandHistory::new();
            let mut s = 0i64;
            for (dt, rate) in steps {
                s += dt;
                h.record(at(s), rate);
                prop_assert!(h.buckets.len() <= keep_buckets());
                if let Ok(f) = h.forecast(at(s), at(s), at(s + 130), Duration::ZERO) {
                    prop_assert!(f.rate.is_finite() && f.rate >= 0.0);
                    prop_assert!(f.levels.iter().all(|l| (MIN_LEVEL..=MAX_LEVEL).contains(l)));
                }
            }
        }
    }
}
