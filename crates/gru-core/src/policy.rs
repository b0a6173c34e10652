//! A fleet's scaling policy and the one function that applies it:
//! [`evaluate`] turns what the fleet reports, the schedule window active now
//! and the operator's overrides into a desired size, with an [`Explanation`]
//! of every step (`gru explain FLEET` prints its `Display`).
//!
//! The pipeline, in the order the explanation lists it:
//!
//! 1. **Rules** ([`Rule`]): each signal recommends a size with a detail
//!    string; the highest recommendation wins (ties: the rule declared
//!    first). No recommendation at all holds the current size.
//! 2. **Overrides of the target**: an operator's pin replaces it (and skips
//!    3–4 and the schedule's bounds: only the fleet's max still applies, so
//!    a pin may go below the fleet's min); a schedule window with a fixed
//!    `desired` replaces it (and skips 3–4; honoured even below the fleet's
//!    min, e.g. `desired = 0` for "dev off at night").
//! 3. **Behaviour** ([`Behaviour`]), load-driven changes only:
//!    tolerance band, then for a scale-in the stabilization window, the
//!    scale-in cooldown and the step limit, for a scale-out the scale-out
//!    cooldown and the step limit.
//! 4. **In-flight floor**: never fewer minions than the in-flight work needs
//!    at the queue-depth target, even when 3 held the fleet lower.
//! 5. **Bounds**: the active window's min/max, else the fleet's. Bounds are
//!    hard: they apply at once, not in steps, so `desired` is always within
//!    them (a night window's max 2 takes effect at its first evaluation).
//!
//! **Schedule vs fleet bounds.** A window overrides the fleet's min and max,
//! and may lower either (to 0: "dev off at night"), but never lifts anything
//! above the fleet's max, which is the fleet's absolute ceiling (a budget the
//! operator set for the fleet as a whole). A window that sets only a max below
//! the fleet's min also lowers the min to it. [`Policy::new`] refuses a window
//! whose min or desired is above the fleet's max; a window max above it is
//! simply no tighter.
//!
//! **Tolerance.** With tolerance `t`, a target within `current ± t·current`
//! (inclusive) changes nothing: 0.1 at 20 minions ignores 18..=22. At 0
//! minions the band is empty, so any demand wakes a fleet from zero.
//!
//! Nothing here reads a clock: `now` is an argument, and the only memory is
//! [`PolicyState`], which the caller keeps between evaluations.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use jiff::Timestamp;

use crate::forecast::{DemandHistory, HistoryMemory};
use crate::scaling::Bounds;
use crate::schedule::{ActiveWindow, Schedule, active_window};

/// Scale-in waits until the highest recommendation over this long is below
/// the current size.
pub const DEFAULT_SCALE_IN_STABILIZATION: Duration = Duration::from_secs(5 * 60);
/// Scale out at once.
pub const DEFAULT_SCALE_OUT_COOLDOWN: Duration = Duration::ZERO;
/// Let a drain finish and its load move before removing the next ones.
pub const DEFAULT_SCALE_IN_COOLDOWN: Duration = Duration::from_secs(60);
pub const DEFAULT_MAX_STEP_OUT: u32 = 10;
/// Scale in small steps.
pub const DEFAULT_MAX_STEP_IN: u32 = 2;
/// ±10 % of the current size.
pub const DEFAULT_TOLERANCE: f64 = 0.1;
/// A scale-out sized on rates clears the backlog within this.
pub const DEFAULT_CLEAR_BACKLOG_WITHIN: Duration = Duration::from_secs(60);
/// Launch to serving, as a minion on EC2 usually takes.
pub const DEFAULT_BOOT_TIME: Duration = Duration::from_secs(2 * 60);
/// How far ahead the break-even hold looks (see [`Behaviour::hold_within`]).
pub const DEFAULT_HOLD_WITHIN: Duration = Duration::from_secs(10 * 60);
/// What the controller evaluates at by default.
pub const DEFAULT_EVAL_INTERVAL: Duration = Duration::from_secs(1);
/// A day of history before the forecast acts, as AWS predictive scaling
/// asks.
pub const DEFAULT_FORECAST_MIN_HISTORY: Duration = Duration::from_secs(24 * 3600);
/// How far back the break-even hold looks for a level being needed again.
pub const HOLD_LOOKBACK: Duration = Duration::from_secs(3600);
/// Idle minutes a level must have over the lookback before the hold judges
/// it.
pub const HOLD_MIN_IDLE_MINUTES: usize = 10;

/// What the predictive part does with its forecast.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ForecastMode {
    /// No forecast.
    Off,
    /// Forecast and explain what it would do, act on nothing.
    #[default]
    Only,
    /// Launch ahead for the forecast (never scale in on it alone).
    On,
}

impl ForecastMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ForecastMode::Off => "off",
            ForecastMode::Only => "forecast_only",
            ForecastMode::On => "on",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "off" => Some(ForecastMode::Off),
            "forecast_only" => Some(ForecastMode::Only),
            "on" => Some(ForecastMode::On),
            _ => None,
        }
    }
}

/// A signal that recommends a fleet size. Add a variant for a new signal and
/// its arm in [`Rule::recommend`].
#[derive(Clone, Debug, PartialEq)]
pub enum Rule {
    /// desired = ceil((queued + in flight) / target) over the minions that
    /// count as capacity and reported.
    QueueDepth { target_per_minion: u32 },
    /// Enough minions that the queued and in-flight work drains within
    /// `target` at the minions' mean reported processing rate (over those
    /// that reported a positive rate). A minion with little to do reports
    /// less than it could process, so under light load this errs high.
    Latency { target: Duration },
    /// A backlog outside the fleet, e.g. an SQS queue's visible plus
    /// in-flight messages: desired = ceil(value / target), or 0 while the
    /// value is at or below `activation`. Unlike the rules above it sees
    /// work while the fleet has no minions, so it can wake a fleet from
    /// zero.
    External {
        signal: String,
        target_per_minion: u32,
        activation: u64,
    },
    /// Sized on rates: enough minions to serve the arrival rate at
    /// `utilization` of the rate one minion serves at full load, plus
    /// enough to clear, within `clear_backlog_within`, the work that will
    /// still be waiting when a minion launched now is ready (one
    /// `boot_time` from now, the capacity already there, booting included,
    /// serving until then). A burst the fleet clears before a launch could
    /// help launches nothing. Needs the arrival rate (two evaluations with
    /// reported rates) and a service rate (learned, or the prior).
    Arrivals { utilization: f64 },
}

/// How fast the size may move.
#[derive(Clone, Debug, PartialEq)]
pub struct Behaviour {
    /// The most minions one decision adds.
    pub max_step_out: u32,
    /// The most minions one decision removes.
    pub max_step_in: u32,
    /// No scale-out until this long after the last scale-out.
    pub scale_out_cooldown: Duration,
    /// No scale-in until this long after the last scale-in.
    pub scale_in_cooldown: Duration,
    /// Scale in only to the highest recommendation over this long.
    pub scale_in_stabilization: Duration,
    /// A fraction of the current size (0 ≤ t < 1) within which a
    /// recommendation changes nothing; also the headroom over the arrival
    /// rate a scale-out sized on rates keeps.
    pub tolerance: f64,
    /// A scale-out is never larger than the minions that serve the arrival
    /// rate (with `tolerance` of headroom) and clear the fleet's backlog
    /// within this, at the rate busy minions process (see
    /// [`ClipKind::ArrivalRate`]).
    pub clear_backlog_within: Duration,
    /// Launch to serving: the forecast looks this far (plus one
    /// `eval_interval`) ahead, and the rule sized on rates counts what the
    /// fleet clears until a launch is ready.
    pub boot_time: Duration,
    /// The break-even hold keeps idle minions likely needed again within
    /// this. Taking one away and launching it again bills its drain and its
    /// boot, and the work that needs it waits that boot: the billed
    /// break-even alone (boot + drain, 2m30s) left a launch-and-drain cycle
    /// per dump on the batch trace, hence the default of 10 minutes.
    pub hold_within: Duration,
    /// How often the policy is evaluated.
    pub eval_interval: Duration,
    /// What one minion serves per second at full load, until busy minions
    /// show it (a prior; learned values replace it).
    pub service_rate: Option<f64>,
    /// Keep idle minions while the fleet's recent past says they are
    /// likely needed again within `hold_within` (see
    /// [`ClipKind::BreakEvenHold`]).
    pub break_even_hold: bool,
    pub forecast: ForecastMode,
    /// The history the forecast needs before it says anything.
    pub forecast_min_history: Duration,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            max_step_out: DEFAULT_MAX_STEP_OUT,
            max_step_in: DEFAULT_MAX_STEP_IN,
            scale_out_cooldown: DEFAULT_SCALE_OUT_COOLDOWN,
            scale_in_cooldown: DEFAULT_SCALE_IN_COOLDOWN,
            scale_in_stabilization: DEFAULT_SCALE_IN_STABILIZATION,
            tolerance: DEFAULT_TOLERANCE,
            clear_backlog_within: DEFAULT_CLEAR_BACKLOG_WITHIN,
            boot_time: DEFAULT_BOOT_TIME,
            hold_within: DEFAULT_HOLD_WITHIN,
            eval_interval: DEFAULT_EVAL_INTERVAL,
            service_rate: None,
            break_even_hold: true,
            forecast: ForecastMode::default(),
            forecast_min_history: DEFAULT_FORECAST_MIN_HISTORY,
        }
    }
}

/// A fleet's validated scaling policy.
#[derive(Clone, Debug)]
pub struct Policy {
    bounds: Bounds,
    rules: Vec<Rule>,
    behaviour: Behaviour,
    schedules: Vec<Schedule>,
}

/// Why a policy was refused. [`PolicyError::path`] names the key at fault,
/// relative to the fleet (`rules[0].target_per_minion`).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PolicyError {
    #[error("target must be at least 1")]
    ZeroTarget { rule: usize },
    #[error("target latency must be more than zero")]
    ZeroLatency { rule: usize },
    #[error("external signal name must not be empty")]
    EmptySignal { rule: usize },
    #[error("must be at least 1")]
    ZeroStep { field: &'static str },
    #[error("tolerance {value} is not in 0..1")]
    BadTolerance { value: f64 },
    #[error("must be more than zero")]
    ZeroClearTime,
    #[error("utilization {value} is not in (0, 1]")]
    BadUtilization { rule: usize, value: f64 },
    #[error("service rate {value} is not a number of messages per second above 0")]
    BadServiceRate { value: f64 },
    #[error("schedule name `{name}` is used twice")]
    DuplicateSchedule { schedule: usize, name: String },
    #[error("{value} is above the fleet's max {fleet_max}")]
    ScheduleAboveFleetMax {
        schedule: usize,
        field: &'static str,
        value: u32,
        fleet_max: u32,
    },
}

impl PolicyError {
    /// The rule at fault, by index, when a rule is.
    pub fn rule(&self) -> Option<usize> {
        match self {
            PolicyError::ZeroTarget { rule }
            | PolicyError::ZeroLatency { rule }
            | PolicyError::EmptySignal { rule }
            | PolicyError::BadUtilization { rule, .. } => Some(*rule),
            _ => None,
        }
    }

    /// Where in the fleet's configuration the error is.
    pub fn path(&self) -> String {
        match self {
            PolicyError::ZeroTarget { rule } => format!("rules[{rule}].target_per_minion"),
            PolicyError::ZeroLatency { rule } => format!("rules[{rule}].target"),
            PolicyError::EmptySignal { rule } => format!("rules[{rule}].signal"),
            PolicyError::ZeroStep { field } => format!("behaviour.{field}"),
            PolicyError::BadTolerance { .. } => "behaviour.tolerance".to_owned(),
            PolicyError::ZeroClearTime => "behaviour.clear_backlog_within".to_owned(),
            PolicyError::BadUtilization { rule, .. } => format!("rules[{rule}].utilization"),
            PolicyError::BadServiceRate { .. } => "behaviour.service_rate".to_owned(),
            PolicyError::DuplicateSchedule { schedule, .. } => {
                format!("schedules[{schedule}].name")
            }
            PolicyError::ScheduleAboveFleetMax {
                schedule, field, ..
            } => format!("schedules[{schedule}].{field}"),
        }
    }
}

impl Policy {
    pub fn new(
        bounds: Bounds,
        rules: Vec<Rule>,
        behaviour: Behaviour,
        schedules: Vec<Schedule>,
    ) -> Result<Policy, PolicyError> {
        for (rule, r) in rules.iter().enumerate() {
            match r {
                Rule::QueueDepth {
                    target_per_minion: 0,
                }
                | Rule::External {
                    target_per_minion: 0,
                    ..
                } => return Err(PolicyError::ZeroTarget { rule }),
                Rule::Latency { target } if target.is_zero() => {
                    return Err(PolicyError::ZeroLatency { rule });
                }
                Rule::Arrivals { utilization } if !(*utilization > 0.0 && *utilization <= 1.0) => {
                    return Err(PolicyError::BadUtilization {
                        rule,
                        value: *utilization,
                    });
                }
                Rule::External { signal, .. } if signal.trim().is_empty() => {
                    return Err(PolicyError::EmptySignal { rule });
                }
                _ => {}
            }
        }
        if behaviour.max_step_out == 0 {
            return Err(PolicyError::ZeroStep {
                field: "max_step_out",
            });
        }
        if behaviour.max_step_in == 0 {
            return Err(PolicyError::ZeroStep {
                field: "max_step_in",
            });
        }
        if !(0.0..1.0).contains(&behaviour.tolerance) {
            return Err(PolicyError::BadTolerance {
                value: behaviour.tolerance,
            });
        }
        if behaviour.clear_backlog_within.is_zero() {
            return Err(PolicyError::ZeroClearTime);
        }
        if let Some(value) = behaviour.service_rate
            && !(value.is_finite() && value > 0.0)
        {
            return Err(PolicyError::BadServiceRate { value });
        }
        for (i, s) in schedules.iter().enumerate() {
            if schedules[..i].iter().any(|o| o.name() == s.name()) {
                return Err(PolicyError::DuplicateSchedule {
                    schedule: i,
                    name: s.name().to_owned(),
                });
            }
            for (field, value) in [("min", s.min()), ("desired", s.desired())] {
                if let Some(value) = value
                    && value > bounds.max
                {
                    return Err(PolicyError::ScheduleAboveFleetMax {
                        schedule: i,
                        field,
                        value,
                        fleet_max: bounds.max,
                    });
                }
            }
        }
        Ok(Policy {
            bounds,
            rules,
            behaviour,
            schedules,
        })
    }

    pub fn bounds(&self) -> Bounds {
        self.bounds
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn behaviour(&self) -> &Behaviour {
        &self.behaviour
    }

    pub fn schedules(&self) -> &[Schedule] {
        &self.schedules
    }
}

/// The work one minion reported. Only minions that count as capacity and
/// take work (Ready, InService) belong in an [`Observation`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MinionLoad {
    pub queued: u64,
    pub in_flight: u64,
    /// Messages processed per second, if the minion reports it.
    pub rate_per_s: Option<f64>,
}

/// A named value from outside the fleet, for [`Rule::External`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalSignal {
    pub name: String,
    pub value: u64,
}

/// What the fleet looks like now.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observation {
    /// The size the fleet has or is already heading to (the group's desired
    /// capacity): steps, cooldowns and tolerance move from here.
    pub capacity: u32,
    pub minions: Vec<MinionLoad>,
    pub external: Vec<ExternalSignal>,
}

/// An operator's pin: the fleet's size until `until` (forever if `None`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pin {
    pub desired: u32,
    pub until: Option<Timestamp>,
}

/// What operators said about this fleet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    /// Compute and explain decisions but do not apply them.
    pub paused: bool,
    pub pin: Option<Pin>,
}

/// What an evaluation remembers for the next one. Keep one per fleet; a new
/// (empty) one after a controller restart only forgets the stabilization
/// history and cooldowns, which is safe.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicyState {
    /// (time, recommendation) over the stabilization window, recommendations
    /// strictly decreasing from front to back, so the front is the peak.
    recent: VecDeque<(Timestamp, u32)>,
    last_scale_out: Option<Timestamp>,
    last_scale_in: Option<Timestamp>,
    /// The work (queued + in flight) the last evaluation saw, and when: its
    /// growth is arrivals the minions did not serve. Not kept across a
    /// restart (the first evaluation after one has no growth to go on).
    last_work: Option<(Timestamp, u64)>,
    /// What one minion processes per second at full load, learned from
    /// the rates busy minions report (see [`PolicyState::learn_service_rate`]).
    /// Not kept across a restart.
    service_rate: Option<f64>,
    /// Arrival rates, for the forecast.
    history: DemandHistory,
    /// The highest target the rules set in each minute (unix minute,
    /// target) over the last [`HOLD_LOOKBACK`], oldest first, for the
    /// break-even hold.
    needs: VecDeque<(i64, u32)>,
}

/// What [`PolicyState`] remembers, as plain values a controller can keep
/// in its store and hand back after a restart.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicyMemory {
    /// Recommendations over the stabilization window, oldest first.
    pub recent: Vec<(Timestamp, u32)>,
    pub last_scale_out: Option<Timestamp>,
    pub last_scale_in: Option<Timestamp>,
    /// The arrival-rate history the forecast reads.
    pub history: HistoryMemory,
    /// The highest target per minute (the minute's start) for the
    /// break-even hold, oldest first.
    pub needs: Vec<(Timestamp, u32)>,
}

impl PolicyState {
    pub fn new() -> Self {
        PolicyState::default()
    }

    /// The state as plain values, for a store.
    pub fn memory(&self) -> PolicyMemory {
        PolicyMemory {
            recent: self.recent.iter().copied().collect(),
            last_scale_out: self.last_scale_out,
            last_scale_in: self.last_scale_in,
            history: self.history.memory(),
            needs: self
                .needs
                .iter()
                .filter_map(|&(m, v)| Some((Timestamp::from_second(m * 60).ok()?, v)))
                .collect(),
        }
    }

    /// A state from what [`PolicyState::memory`] gave. The window's order
    /// invariant (strictly decreasing recommendations) is restored, so a
    /// memory edited by hand cannot confuse the peak.
    pub fn from_memory(memory: PolicyMemory) -> Self {
        let mut state = PolicyState {
            recent: VecDeque::new(),
            last_scale_out: memory.last_scale_out,
            last_scale_in: memory.last_scale_in,
            last_work: None,
            service_rate: None,
            history: DemandHistory::from_memory(&memory.history),
            needs: VecDeque::new(),
        };
        let mut needs = memory.needs;
        needs.sort_by_key(|(at, _)| *at);
        for (at, v) in needs {
            state.record_need(at, v);
        }
        let mut recent = memory.recent;
        recent.sort_by_key(|(at, _)| *at);
        for (at, v) in recent {
            state.record(at, v, Duration::MAX);
        }
        state
    }

    /// When an applied decision last grew the fleet.
    pub fn last_scale_out(&self) -> Option<Timestamp> {
        self.last_scale_out
    }

    /// When an applied decision last shrank the fleet.
    pub fn last_scale_in(&self) -> Option<Timestamp> {
        self.last_scale_in
    }

    /// What one minion serves per second at full load, as learned so far.
    pub fn service_rate(&self) -> Option<f64> {
        self.service_rate
    }

    /// Learns the service rate from `load`: while minions have a queue they
    /// process as fast as they can, so their mean rate is the service rate
    /// (smoothed over evaluations); without a queue a minion processes only
    /// what it is given, which raises the estimate when it is above it and
    /// says nothing otherwise.
    fn learn_service_rate(&mut self, load: &LoadSummary) -> Option<f64> {
        const WEIGHT: f64 = 0.2;
        if let Some(rate) = load.rate_per_minion() {
            self.service_rate = Some(match self.service_rate {
                None if load.queued > 0 => rate,
                None => return None,
                Some(known) if load.queued > 0 => known + WEIGHT * (rate - known),
                Some(known) => known.max(rate),
            });
        }
        self.service_rate
    }

    /// Counts `capacity` as recommended at `now`. A controller that has just
    /// started calls this once, so it keeps the size it found for a whole
    /// stabilization window instead of scaling in at its first decision.
    pub fn record_recommendation(&mut self, now: Timestamp, capacity: u32) {
        self.record(now, capacity, Duration::MAX);
    }

    /// The demand history the forecast reads.
    pub fn history(&self) -> &DemandHistory {
        &self.history
    }

    /// Counts `target` as needed in `now`'s minute.
    fn record_need(&mut self, now: Timestamp, target: u32) {
        let minute = now.as_second().div_euclid(60);
        match self.needs.back_mut() {
            Some((m, v)) if *m >= minute => *v = (*v).max(target),
            _ => self.needs.push_back((minute, target)),
        }
        let keep = (HOLD_LOOKBACK.as_secs() / 60) as i64;
        while self.needs.front().is_some_and(|&(m, _)| m < minute - keep) {
            self.needs.pop_front();
        }
    }

    /// The highest level in `(floor, current]` the fleet's recent past says
    /// to keep: over the last [`HOLD_LOOKBACK`], of the minutes in which
    /// fewer than that many minions were needed, at least half were
    /// followed by a need for that many within `horizon`. Returns the
    /// level, those minutes, and how many of them were followed so.
    fn hold_level(
        &self,
        now: Timestamp,
        floor: u32,
        current: u32,
        horizon: Duration,
    ) -> Option<(u32, usize, usize)> {
        let minute = now.as_second().div_euclid(60);
        let ahead = horizon.as_secs().div_ceil(60).max(1) as i64;
        let since = minute - (HOLD_LOOKBACK.as_secs() / 60) as i64;
        // Minute → need over the window, 0 where nothing was recorded
        // (only minutes with a record are judged).
        let needs: Vec<(i64, u32)> = self
            .needs
            .iter()
            .copied()
            .filter(|&(m, _)| m >= since && m < minute)
            .collect();
        let need_at = |m: i64| {
            needs
                .binary_search_by_key(&m, |&(k, _)| k)
                .ok()
                .map(|i| needs[i].1)
        };
        for level in (floor + 1..=current).rev() {
            let (mut idle, mut again) = (0, 0);
            for &(m, v) in &needs {
                // Only minutes whose whole horizon has been seen.
                if v >= level || m + ahead >= minute {
                    continue;
                }
                idle += 1;
                if (m + 1..=m + ahead).any(|k| need_at(k).is_some_and(|n| n >= level)) {
                    again += 1;
                }
            }
            if idle >= HOLD_MIN_IDLE_MINUTES && again * 2 >= idle {
                return Some((level, idle, again));
            }
        }
        None
    }

    /// Records `recommended` at `now` and returns the peak over `window`
    /// (including this one) with when it was seen.
    fn record(&mut self, now: Timestamp, recommended: u32, window: Duration) -> (Timestamp, u32) {
        while let Some(&(at, _)) = self.recent.front() {
            if elapsed(at, now) > window {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        // An older entry at or below the new one can never be the peak again.
        while let Some(&(_, v)) = self.recent.back() {
            if v <= recommended {
                self.recent.pop_back();
            } else {
                break;
            }
        }
        self.recent.push_back((now, recommended));
        self.recent.front().copied().unwrap_or((now, recommended))
    }
}

/// Time from `earlier` to `now`; zero if the clock went backwards.
fn elapsed(earlier: Timestamp, now: Timestamp) -> Duration {
    Duration::try_from(now.duration_since(earlier)).unwrap_or(Duration::ZERO)
}

/// Minions that serve `rate` messages per second at `per_minion` each.
fn minions_for(rate: f64, per_minion: f64) -> u32 {
    let n = (rate / per_minion).ceil();
    if n >= f64::from(u32::MAX) {
        u32::MAX
    } else if n > 0.0 {
        n as u32
    } else {
        0
    }
}

/// Messages arriving per second: what the minions processed plus how fast
/// their work grew since the last evaluation. `None` without an earlier
/// evaluation or any reported rate.
fn arrivals_per_s(
    last: Option<(Timestamp, u64)>,
    load: &LoadSummary,
    now: Timestamp,
) -> Option<f64> {
    let (at, work) = last?;
    let secs = elapsed(at, now).as_secs_f64();
    if secs <= 0.0 || load.rate_reporters == 0 {
        return None;
    }
    let growth = (load.work() as f64 - work as f64) / secs;
    Some(load.rate_per_s + growth.max(0.0))
}

/// The load that went into a decision, summed over the reporting minions.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LoadSummary {
    pub minions: u32,
    pub queued: u64,
    pub in_flight: u64,
    /// Sum of the positive rates reported.
    pub rate_per_s: f64,
    /// How many minions reported a positive rate.
    pub rate_reporters: u32,
}

impl LoadSummary {
    pub fn of(minions: &[MinionLoad]) -> LoadSummary {
        let mut s = LoadSummary {
            minions: u32::try_from(minions.len()).unwrap_or(u32::MAX),
            ..LoadSummary::default()
        };
        for m in minions {
            s.queued = s.queued.saturating_add(m.queued);
            s.in_flight = s.in_flight.saturating_add(m.in_flight);
            if let Some(r) = m.rate_per_s.filter(|r| r.is_finite() && *r > 0.0) {
                s.rate_per_s += r;
                s.rate_reporters += 1;
            }
        }
        s
    }

    pub fn work(&self) -> u64 {
        self.queued.saturating_add(self.in_flight)
    }

    /// The mean rate of the minions that reported one.
    pub fn rate_per_minion(&self) -> Option<f64> {
        (self.rate_reporters > 0).then(|| self.rate_per_s / f64::from(self.rate_reporters))
    }
}

/// What the rules read.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    pub load: &'a LoadSummary,
    pub external: &'a [ExternalSignal],
    /// Messages per second arriving, once known.
    pub arrivals: Option<f64>,
    /// What one minion serves per second at full load, once known.
    pub service_rate: Option<f64>,
    /// Minions counted as capacity, booting ones included.
    pub capacity: u32,
    pub behaviour: &'a Behaviour,
}

const NO_SERVICE_RATE: &str =
    "no service rate yet: set service_rate, or wait for busy minions to show it";

/// One rule's view of the fleet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recommendation {
    /// The rule, e.g. `queue depth` or `external sqs`.
    pub rule: String,
    /// `None` when the rule had nothing to go on (no rate, no signal value).
    pub desired: Option<u32>,
    /// How the rule got there, for people.
    pub detail: String,
}

fn ceil_div(work: u64, per: u32) -> u32 {
    u32::try_from(work.div_ceil(u64::from(per.max(1)))).unwrap_or(u32::MAX)
}

impl Rule {
    /// The rule's name as explanations show it.
    pub fn name(&self) -> String {
        match self {
            Rule::QueueDepth { .. } => "queue depth".to_owned(),
            Rule::Latency { .. } => "latency".to_owned(),
            Rule::External { signal, .. } => format!("external {signal}"),
            Rule::Arrivals { .. } => "arrival rate".to_owned(),
        }
    }

    pub fn recommend(&self, inputs: &Inputs) -> Recommendation {
        let load = inputs.load;
        let external = inputs.external;
        let (desired, detail) = match self {
            Rule::QueueDepth { target_per_minion } => (
                Some(ceil_div(load.work(), *target_per_minion)),
                format!(
                    "queued+in-flight {} / {} per minion",
                    load.work(),
                    target_per_minion
                ),
            ),
            Rule::Latency { target } => {
                let work = load.work();
                let secs = target.as_secs_f64();
                match load.rate_per_minion() {
                    _ if work == 0 => (Some(0), "nothing queued or in flight".to_owned()),
                    None => (None, "no minion reported a processing rate".to_owned()),
                    Some(rate) => {
                        let n = (work as f64 / (rate * secs)).ceil();
                        let n = if n >= f64::from(u32::MAX) {
                            u32::MAX
                        } else {
                            n as u32
                        };
                        (
                            Some(n),
                            format!(
                                "queued+in-flight {work} at {rate:.1} msg/s per minion within {}",
                                DurationText(*target)
                            ),
                        )
                    }
                }
            }
            Rule::External {
                signal,
                target_per_minion,
                activation,
            } => match external.iter().find(|e| &e.name == signal) {
                Some(e) if *activation > 0 && e.value <= *activation => (
                    Some(0),
                    format!(
                        "{signal} {} at or below its activation {activation}",
                        e.value
                    ),
                ),
                Some(e) => (
                    Some(ceil_div(e.value, *target_per_minion)),
                    format!("{signal} {} / {target_per_minion} per minion", e.value),
                ),
                None => (None, format!("no value reported for {signal}")),
            },
            Rule::Arrivals { utilization } => match (inputs.arrivals, inputs.service_rate) {
                (None, _) => (
                    None,
                    "no arrival rate yet: needs two reports from minions with a rate".to_owned(),
                ),
                (_, None) => (None, NO_SERVICE_RATE.to_owned()),
                (Some(arrivals), Some(per_minion)) => {
                    let b = inputs.behaviour;
                    let serve = arrivals / (per_minion * utilization);
                    let boot = b.boot_time.as_secs_f64();
                    let waiting = (load.work() as f64
                        + (arrivals - f64::from(inputs.capacity) * per_minion) * boot)
                        .max(0.0);
                    let clear = waiting / (per_minion * b.clear_backlog_within.as_secs_f64());
                    (
                        Some(minions_for(serve + clear, 1.0)),
                        format!(
                            "{arrivals:.0} msg/s arriving at {per_minion:.1} msg/s per minion and {:.0}% utilization: {serve:.1}; {waiting:.0} of the {} queued+in-flight still waiting one boot ({}) from now, on {} minions, cleared within {}: +{clear:.1}",
                            utilization * 100.0,
                            load.work(),
                            DurationText(b.boot_time),
                            inputs.capacity,
                            DurationText(b.clear_backlog_within)
                        ),
                    )
                }
            },
        };
        Recommendation {
            rule: self.name(),
            desired,
            detail,
        }
    }

    /// Minions the in-flight work needs, for rules that say.
    fn in_flight_need(&self, load: &LoadSummary) -> Option<u32> {
        match self {
            Rule::QueueDepth { target_per_minion } => {
                Some(ceil_div(load.in_flight, *target_per_minion))
            }
            _ => None,
        }
    }
}

/// What set the target before behaviour and bounds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// The winning rule, by index into the recommendations.
    Rule(usize),
    /// No rule recommended anything: hold the current size.
    NoRecommendation,
    /// The active schedule window's fixed desired.
    Schedule(String),
    /// An operator's pin.
    Pin,
}

/// The state of the operator's pin at this evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinStatus {
    None,
    Active(Pin),
    /// Past its `until`: ignored.
    Expired(Pin),
}

/// What moved the target, in pipeline order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClipKind {
    Tolerance,
    Stabilization,
    BreakEvenHold,
    ScaleOutCooldown,
    ScaleInCooldown,
    ArrivalRate,
    MaxStepOut,
    MaxStepIn,
    InFlightFloor,
    ScheduleMin,
    ScheduleMax,
    FleetMin,
    FleetMax,
}

impl ClipKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ClipKind::Tolerance => "tolerance",
            ClipKind::Stabilization => "stabilization",
            ClipKind::BreakEvenHold => "break-even hold",
            ClipKind::ScaleOutCooldown => "scale-out cooldown",
            ClipKind::ScaleInCooldown => "scale-in cooldown",
            ClipKind::ArrivalRate => "arrival rate",
            ClipKind::MaxStepOut => "max step out",
            ClipKind::MaxStepIn => "max step in",
            ClipKind::InFlightFloor => "in-flight floor",
            ClipKind::ScheduleMin => "schedule min",
            ClipKind::ScheduleMax => "schedule max",
            ClipKind::FleetMin => "fleet min",
            ClipKind::FleetMax => "fleet max",
        }
    }
}

/// One step that changed the target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Clip {
    pub kind: ClipKind,
    pub before: u32,
    pub after: u32,
    pub detail: String,
}

/// Everything a decision was made from and every step it took.
#[derive(Clone, Debug, PartialEq)]
pub struct Explanation {
    pub at: Timestamp,
    /// The size the decision moved from.
    pub capacity: u32,
    pub load: LoadSummary,
    pub external: Vec<ExternalSignal>,
    /// Messages per second arriving, once two evaluations showed it.
    pub arrivals_per_s: Option<f64>,
    /// What one minion serves per second at full load, as learned (or the
    /// configured prior).
    pub service_rate: Option<f64>,
    /// What the forecast asks for, acted on (`on`) or not
    /// (`forecast_only`); `None` while it has nothing to say.
    pub forecast: Option<u32>,
    pub window: Option<ActiveWindow>,
    pub paused: bool,
    pub pin: PinStatus,
    pub recommendations: Vec<Recommendation>,
    pub source: Source,
    /// The target before behaviour and bounds.
    pub target: u32,
    pub clips: Vec<Clip>,
    pub desired: u32,
    pub applied: bool,
}

impl Explanation {
    /// What decided, in a word: the winning rule's name, `schedule`, `pin`
    /// or `none`.
    pub fn source_name(&self) -> String {
        match &self.source {
            Source::Rule(i) => self
                .recommendations
                .get(*i)
                .map_or_else(|| "rule".to_owned(), |r| r.rule.clone()),
            Source::NoRecommendation => "none".to_owned(),
            Source::Schedule(_) => "schedule".to_owned(),
            Source::Pin => "pin".to_owned(),
        }
    }
}

/// The outcome of one evaluation.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub desired: u32,
    /// False when the fleet is paused: the caller must not change the size.
    pub applied: bool,
    pub explanation: Explanation,
}

/// The active bounds with what set each side.
struct ActiveBounds {
    min: (u32, ClipKind, String),
    max: (u32, ClipKind, String),
}

fn active_bounds(fleet: Bounds, window: Option<&ActiveWindow>) -> ActiveBounds {
    let fleet_max = (
        fleet.max,
        ClipKind::FleetMax,
        format!("fleet max {}", fleet.max),
    );
    let Some(w) = window else {
        return ActiveBounds {
            min: (
                fleet.min,
                ClipKind::FleetMin,
                format!("fleet min {}", fleet.min),
            ),
            max: fleet_max,
        };
    };
    let max = match w.max {
        Some(m) if m < fleet.max => (
            m,
            ClipKind::ScheduleMax,
            format!("window {} max {m}", w.name),
        ),
        Some(m) => (
            fleet.max,
            ClipKind::FleetMax,
            format!("fleet max {} (window {} max {m})", fleet.max, w.name),
        ),
        None => fleet_max,
    };
    let min = match w.min {
        Some(m) => (
            m.min(max.0),
            ClipKind::ScheduleMin,
            format!("window {} min {m}", w.name),
        ),
        None if fleet.min > max.0 => (
            max.0,
            ClipKind::FleetMin,
            format!(
                "fleet min {} lowered to the window's max {}",
                fleet.min, max.0
            ),
        ),
        None => (
            fleet.min,
            ClipKind::FleetMin,
            format!("fleet min {}", fleet.min),
        ),
    };
    ActiveBounds { min, max }
}

/// The bounds in force: the fleet's own, narrowed by the active schedule
/// window's (a window's max never raises the fleet's).
pub fn effective_bounds(fleet: Bounds, window: Option<&ActiveWindow>) -> Bounds {
    let b = active_bounds(fleet, window);
    Bounds {
        min: b.min.0,
        max: b.max.0,
    }
}

/// Applies `policy` to the fleet as observed at `now`.
///
/// `state` carries the stabilization history and the cooldown clocks from
/// one evaluation to the next; the function assumes an applied decision is
/// carried out (it starts the cooldowns). A paused fleet's decision is
/// computed and explained the same way but flagged not applied, and starts
/// no cooldown.
pub fn evaluate(
    policy: &Policy,
    state: &mut PolicyState,
    obs: &Observation,
    overrides: &Overrides,
    now: Timestamp,
) -> Decision {
    let load = LoadSummary::of(&obs.minions);
    let current = obs.capacity;
    let behaviour = &policy.behaviour;
    let arrivals = arrivals_per_s(state.last_work, &load, now);
    state.last_work = Some((now, load.work()));
    if state.service_rate.is_none() {
        state.service_rate = behaviour.service_rate;
    }
    let service_rate = state.learn_service_rate(&load);
    if let Some(a) = arrivals {
        state.history.record(now, a);
    }
    let mut recommendations: Vec<Recommendation> = policy
        .rules
        .iter()
        .map(|r| {
            r.recommend(&Inputs {
                load: &load,
                external: &obs.external,
                arrivals,
                service_rate,
                capacity: current,
                behaviour,
            })
        })
        .collect();
    let any_rule = recommendations.iter().any(|r| r.desired.is_some());
    let forecast = forecast_recommendation(behaviour, state, service_rate, now);
    if let Some((n, _)) = &forecast {
        let mut r = n.clone();
        // Never scale in on a forecast alone: with no rule to go on it only
        // ever raises the size.
        if !any_rule && r.desired.is_some_and(|d| d <= current) {
            r.desired = None;
            r.detail = format!(
                "{}; no rule recommends, so it does not lower the size",
                r.detail
            );
        }
        if behaviour.forecast == ForecastMode::Only {
            r.desired = None;
        }
        recommendations.push(r);
    }
    let winner = recommendations
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.desired.map(|d| (i, d)))
        // max_by_key keeps the last of equal maxima; reverse for the first.
        .rev()
        .max_by_key(|&(_, d)| d);
    let rules_target = winner.map_or(current, |(_, d)| d);
    if let (Some((_, Some(would))), Some(r)) = (&forecast, recommendations.last_mut())
        && behaviour.forecast == ForecastMode::Only
    {
        r.detail = if *would > rules_target {
            format!(
                "forecast only, not acted on: would raise the target from {rules_target} to {would}; {}",
                r.detail
            )
        } else {
            format!(
                "forecast only, not acted on: would recommend {would}, not above the rules' {rules_target}; {}",
                r.detail
            )
        };
    }
    // Always record, so stabilization after a pin or a pause sees the load.
    let peak = state.record(now, rules_target, behaviour.scale_in_stabilization);
    state.record_need(now, rules_target);

    let window = active_window(&policy.schedules, now);
    let pin = match overrides.pin {
        None => PinStatus::None,
        Some(p) if p.until.is_some_and(|u| u <= now) => PinStatus::Expired(p),
        Some(p) => PinStatus::Active(p),
    };

    let mut clips = Vec::new();
    let mut clip = |kind: ClipKind, before: u32, after: u32, detail: String| {
        clips.push(Clip {
            kind,
            before,
            after,
            detail,
        });
        after
    };

    let (source, target, bounds) = match (&pin, &window) {
        (PinStatus::Active(p), _) => {
            // Operators may pin below the fleet's min (and outside any
            // window), never above its max.
            let b = ActiveBounds {
                min: (0, ClipKind::FleetMin, String::new()),
                max: (
                    policy.bounds.max,
                    ClipKind::FleetMax,
                    format!("fleet max {}", policy.bounds.max),
                ),
            };
            (Source::Pin, p.desired, b)
        }
        (_, Some(w)) if w.desired.is_some() => {
            let fixed = w.desired.unwrap_or(current);
            // The window's own size goes below the fleet's min if it says
            // so ("dev off": desired 0); validation keeps it within the
            // window's bounds and the fleet's max.
            let mut b = active_bounds(policy.bounds, Some(w));
            b.min.0 = b.min.0.min(fixed);
            (Source::Schedule(w.name.clone()), fixed, b)
        }
        _ => (
            winner.map_or(Source::NoRecommendation, |(i, _)| Source::Rule(i)),
            rules_target,
            active_bounds(policy.bounds, window.as_ref()),
        ),
    };

    let mut desired = target;
    // Rules that size on the fleet's own backlog, which the arrival rate
    // bounds both ways.
    let backlog_rule = matches!(
        winner.and_then(|(i, _)| policy.rules.get(i)),
        Some(Rule::QueueDepth { .. } | Rule::Latency { .. })
    ) && matches!(source, Source::Rule(_));
    if matches!(source, Source::Rule(_) | Source::NoRecommendation) {
        // Tolerance: a target close to the current size changes nothing.
        let band = behaviour.tolerance * f64::from(current);
        if desired != current && f64::from(desired.abs_diff(current)) <= band {
            desired = clip(
                ClipKind::Tolerance,
                desired,
                current,
                format!(
                    "within ±{:.0}% of {current} (±{band:.1})",
                    behaviour.tolerance * 100.0
                ),
            );
        }
        // Never fewer minions than serve what arrives: a backlog target
        // above what a minion holds at full load (its concurrency) reads a
        // fleet that keeps up as too big, and the queue that follows a
        // scale-in as a reason to scale out again.
        if desired < current
            && backlog_rule
            && let (Some(arrivals), Some(per_minion)) = (arrivals, service_rate)
        {
            let need = minions_for(arrivals * (1.0 + behaviour.tolerance), per_minion);
            let floor = need.min(current);
            if floor > desired {
                desired = clip(
                    ClipKind::ArrivalRate,
                    desired,
                    floor,
                    format!(
                        "{need} minions at {per_minion:.1} msg/s (learned while busy) serve the {arrivals:.0} msg/s arriving (+{:.0}%)",
                        behaviour.tolerance * 100.0
                    ),
                );
            }
        }
        if desired < current {
            let (peak_at, peak_value) = peak;
            let held = peak_value.min(current);
            if held > desired {
                desired = clip(
                    ClipKind::Stabilization,
                    desired,
                    held,
                    format!(
                        "highest recommendation over the last {} was {peak_value} at {peak_at}",
                        DurationText(behaviour.scale_in_stabilization)
                    ),
                );
            }
        }
        // Taking a minion away and launching it again costs its drain and
        // its boot, and the work that waits for the boot: keep the minions
        // the recent past says are likely needed again soon.
        if desired < current && behaviour.break_even_hold {
            let horizon = behaviour.hold_within;
            let lowest = desired.max(current.saturating_sub(behaviour.max_step_in));
            if let Some((level, idle, again)) = state.hold_level(now, lowest, current, horizon) {
                desired = clip(
                    ClipKind::BreakEvenHold,
                    desired,
                    level,
                    format!(
                        "{level} minions were needed again within {} (hold_within) after {again} of the {idle} minutes fewer sufficed over the last {}",
                        DurationText(horizon),
                        DurationText(HOLD_LOOKBACK)
                    ),
                );
            }
        }
        if desired < current
            && let Some(last) = state.last_scale_in
            && elapsed(last, now) < behaviour.scale_in_cooldown
        {
            desired = clip(
                ClipKind::ScaleInCooldown,
                desired,
                current,
                format!(
                    "last scale-in at {last}, cooldown {}",
                    DurationText(behaviour.scale_in_cooldown)
                ),
            );
        }
        if desired < current && current - desired > behaviour.max_step_in {
            desired = clip(
                ClipKind::MaxStepIn,
                desired,
                current - behaviour.max_step_in,
                format!("at most -{} per decision", behaviour.max_step_in),
            );
        }
        if desired > current
            && let Some(last) = state.last_scale_out
            && elapsed(last, now) < behaviour.scale_out_cooldown
        {
            desired = clip(
                ClipKind::ScaleOutCooldown,
                desired,
                current,
                format!(
                    "last scale-out at {last}, cooldown {}",
                    DurationText(behaviour.scale_out_cooldown)
                ),
            );
        }
        // A backlog rule reads a queue that grew while launched minions
        // booted (and while new ones had not served yet) as demand for more
        // minions, and a rise that outruns a boot would be answered again at
        // every evaluation. What the fleet needs is to serve what arrives
        // and clear what waits: when busy minions show their rate, a
        // scale-out is capped there. Minions booting count as capacity.
        if desired > current
            && backlog_rule
            // Only minions with a queue process at their full rate.
            && load.queued > 0
            && let (Some(arrivals), Some(per_minion)) = (arrivals, service_rate)
        {
            let clear = behaviour.clear_backlog_within.as_secs_f64();
            let need = minions_for(
                arrivals * (1.0 + behaviour.tolerance) + load.work() as f64 / clear,
                per_minion,
            );
            let cap = need.max(current);
            if cap < desired {
                let booting = current.saturating_sub(load.minions);
                desired = clip(
                    ClipKind::ArrivalRate,
                    desired,
                    cap,
                    format!(
                        "{need} minions at {per_minion:.1} msg/s serve {arrivals:.0} msg/s arriving (+{:.0}%) and clear {} queued+in-flight within {}{}",
                        behaviour.tolerance * 100.0,
                        load.work(),
                        DurationText(behaviour.clear_backlog_within),
                        if booting > 0 {
                            format!("; {booting} of the {current} still booting")
                        } else {
                            String::new()
                        }
                    ),
                );
            }
        }
        if desired > current && desired - current > behaviour.max_step_out {
            desired = clip(
                ClipKind::MaxStepOut,
                desired,
                current.saturating_add(behaviour.max_step_out),
                format!("at most +{} per decision", behaviour.max_step_out),
            );
        }
        let need = policy
            .rules
            .iter()
            .filter_map(|r| r.in_flight_need(&load))
            .max()
            .unwrap_or(0);
        if desired < need {
            desired = clip(
                ClipKind::InFlightFloor,
                desired,
                need,
                format!("{} in flight need {need} minions", load.in_flight),
            );
        }
    }
    let (min, min_kind, min_detail) = bounds.min;
    let (max, max_kind, max_detail) = bounds.max;
    if desired < min {
        desired = clip(min_kind, desired, min, min_detail);
    }
    if desired > max {
        desired = clip(max_kind, desired, max, max_detail);
    }

    let applied = !overrides.paused;
    if applied {
        if desired > current {
            state.last_scale_out = Some(now);
        } else if desired < current {
            state.last_scale_in = Some(now);
        }
    }
    Decision {
        desired,
        applied,
        explanation: Explanation {
            at: now,
            capacity: current,
            load,
            external: obs.external.clone(),
            arrivals_per_s: arrivals,
            service_rate,
            forecast: forecast.and_then(|(_, n)| n),
            window,
            paused: overrides.paused,
            pin,
            recommendations,
            source,
            target,
            clips,
            desired,
            applied,
        },
    }
}

/// The forecast's recommendation (before the mode and the no-rule guard
/// are applied) and the minions it asks for, or `None` when the forecast is
/// off.
fn forecast_recommendation(
    behaviour: &Behaviour,
    state: &PolicyState,
    service_rate: Option<f64>,
    now: Timestamp,
) -> Option<(Recommendation, Option<u32>)> {
    if behaviour.forecast == ForecastMode::Off {
        return None;
    }
    let rule = if behaviour.forecast == ForecastMode::Only {
        "forecast (only)"
    } else {
        "forecast"
    }
    .to_owned();
    let from = now.checked_add(behaviour.boot_time).unwrap_or(now);
    let to = from.checked_add(behaviour.eval_interval).unwrap_or(from);
    let forecast = state
        .history
        .forecast(now, from, to, behaviour.forecast_min_history);
    let (desired, detail) = match (forecast, service_rate) {
        (Err(why), _) => (None, why.to_string()),
        (Ok(_), None) => (None, NO_SERVICE_RATE.to_owned()),
        (Ok(f), Some(per_minion)) => {
            let n = minions_for(f.rate * (1.0 + behaviour.tolerance), per_minion);
            let season = |v: Option<f64>, level: f64| {
                v.map_or_else(
                    || "none".to_owned(),
                    |v| format!("{v:.0} x{level:.2} lately"),
                )
            };
            (
                Some(n),
                format!(
                    "{:.0} msg/s expected from {from} (one boot ahead; a day before {}, a week before {}) at {per_minion:.1} msg/s per minion (+{:.0}%)",
                    f.rate,
                    season(f.seasons.day, f.levels[0]),
                    season(f.seasons.week, f.levels[1]),
                    behaviour.tolerance * 100.0
                ),
            )
        }
    };
    Some((
        Recommendation {
            rule,
            desired,
            detail,
        },
        desired,
    ))
}

/// A duration as people write it: `5m`, `90s`, `1h30m`.
struct DurationText(Duration);

/// A duration as people write it (see [`DurationText`]).
pub(crate) fn duration_text(d: Duration) -> String {
    DurationText(d).to_string()
}

impl fmt::Display for DurationText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total = self.0.as_secs();
        if total == 0 {
            return if self.0.is_zero() {
                f.write_str("0s")
            } else {
                write!(f, "{}ms", self.0.as_millis())
            };
        }
        let (h, m, s) = (total / 3600, total / 60 % 60, total % 60);
        if h > 0 {
            write!(f, "{h}h")?;
        }
        if m > 0 {
            write!(f, "{m}m")?;
        }
        if s > 0 {
            write!(f, "{s}s")?;
        }
        Ok(())
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = if self.applied {
            "applied"
        } else {
            "paused, not applied"
        };
        writeln!(
            f,
            "desired {} (from {}), {status}",
            self.desired, self.capacity
        )?;
        writeln!(f, "inputs at {}:", self.at)?;
        let l = &self.load;
        write!(
            f,
            "  load: {} minions, {} queued, {} in flight",
            l.minions, l.queued, l.in_flight
        )?;
        match l.rate_per_minion() {
            Some(_) => writeln!(
                f,
                ", {:.1} msg/s from {} reporting",
                l.rate_per_s, l.rate_reporters
            )?,
            None => writeln!(f, ", no processing rate reported")?,
        }
        let rate = |r: Option<f64>| {
            r.map_or_else(|| "not known yet".to_owned(), |r| format!("{r:.1} msg/s"))
        };
        writeln!(
            f,
            "  rates: {} arriving, {} per minion at full load",
            rate(self.arrivals_per_s),
            rate(self.service_rate)
        )?;
        if !self.external.is_empty() {
            let signals: Vec<String> = self
                .external
                .iter()
                .map(|e| format!("{}={}", e.name, e.value))
                .collect();
            writeln!(f, "  external: {}", signals.join(", "))?;
        }
        match &self.window {
            None => writeln!(f, "  window: none")?,
            Some(w) => {
                write!(
                    f,
                    "  window: {} (priority {}, opened {} {} = {})",
                    w.name,
                    w.priority,
                    w.opened_local.strftime("%Y-%m-%d %H:%M"),
                    w.timezone,
                    w.opened
                )?;
                let mut sets = Vec::new();
                if let Some(m) = w.min {
                    sets.push(format!("min {m}"));
                }
                if let Some(m) = w.max {
                    sets.push(format!("max {m}"));
                }
                if let Some(d) = w.desired {
                    sets.push(format!("desired {d}"));
                }
                write!(f, ": {}", sets.join(", "))?;
                if !w.outranked.is_empty() {
                    write!(f, "; outranks {}", w.outranked.join(", "))?;
                }
                writeln!(f)?;
            }
        }
        let mut overrides = Vec::new();
        if self.paused {
            overrides.push("paused".to_owned());
        }
        match self.pin {
            PinStatus::None => {}
            PinStatus::Active(p) => overrides.push(match p.until {
                Some(u) => format!("pinned at {} until {u}", p.desired),
                None => format!("pinned at {}", p.desired),
            }),
            PinStatus::Expired(p) => overrides.push(format!(
                "pin at {} expired at {}, ignored",
                p.desired,
                p.until.map_or_else(String::new, |u| u.to_string())
            )),
        }
        if overrides.is_empty() {
            overrides.push("none".to_owned());
        }
        writeln!(f, "  overrides: {}", overrides.join("; "))?;
        writeln!(f, "rules:")?;
        if self.recommendations.is_empty() {
            writeln!(f, "  (none)")?;
        }
        for (i, r) in self.recommendations.iter().enumerate() {
            let mark = if self.source == Source::Rule(i) {
                "*"
            } else {
                " "
            };
            match r.desired {
                Some(d) => writeln!(f, "{mark} {}: {d} ({})", r.rule, r.detail)?,
                None => writeln!(f, "{mark} {}: no recommendation ({})", r.rule, r.detail)?,
            }
        }
        match &self.source {
            Source::Rule(i) => writeln!(
                f,
                "target {} from {}",
                self.target,
                self.recommendations
                    .get(*i)
                    .map_or("?", |r| r.rule.as_str())
            )?,
            Source::NoRecommendation => {
                writeln!(f, "target {}: no recommendation, hold", self.target)?
            }
            Source::Schedule(name) => writeln!(f, "target {} fixed by window {name}", self.target)?,
            Source::Pin => writeln!(f, "target {} pinned by an operator", self.target)?,
        }
        if self.clips.is_empty() {
            writeln!(f, "clips: none")?;
        } else {
            writeln!(f, "clips:")?;
            for c in &self.clips {
                writeln!(
                    f,
                    "  {}: {} → {} ({})",
                    c.kind.as_str(),
                    c.before,
                    c.after,
                    c.detail
                )?;
            }
        }
        write!(f, "desired: {}", self.desired)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::{ScheduleSpec, WindowSpec};
    use proptest::prelude::*;

    fn t(s: &str) -> Timestamp {
        s.parse().expect("valid timestamp")
    }

    #[test]
    fn memory_round_trips_and_keeps_the_peak() {
        let mut state = PolicyState::new();
        let w = Duration::from_secs(300);
        state.record(t("2026-11-25T10:00:00Z"), 5, w);
        state.record(t("2026-11-25T10:01:00Z"), 3, w);
        state.last_scale_in = Some(t("2026-11-25T09:00:00Z"));
        let memory = state.memory();
        assert_eq!(memory.recent.len(), 2);
        let mut back = PolicyState::from_memory(memory.clone());
        assert_eq!(back.memory(), memory);
        assert_eq!(
            back.record(t("2026-11-25T10:02:00Z"), 1, w),
            (t("2026-11-25T10:00:00Z"), 5),
            "the peak survives the round trip"
        );
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    /// Behaviour that changes nothing, so each test switches on what it checks.
    fn free() -> Behaviour {
        Behaviour {
            max_step_out: u32::MAX,
            max_step_in: u32::MAX,
            scale_out_cooldown: Duration::ZERO,
            scale_in_cooldown: Duration::ZERO,
            scale_in_stabilization: Duration::ZERO,
            tolerance: 0.0,
            clear_backlog_within: DEFAULT_CLEAR_BACKLOG_WITHIN,
            break_even_hold: false,
            forecast: ForecastMode::Off,
            ..Behaviour::default()
        }
    }

    fn queue(target: u32) -> Rule {
        Rule::QueueDepth {
            target_per_minion: target,
        }
    }

    fn policy(min: u32, max: u32, rules: Vec<Rule>, b: Behaviour, s: Vec<Schedule>) -> Policy {
        Policy::new(Bounds::new(min, max).expect("bounds"), rules, b, s).expect("valid policy")
    }

    /// `capacity` minions, with `queued` spread over them (all on one if
    /// there are none) and `in_flight` on the first.
    fn obs(capacity: u32, queued: u64, in_flight: u64) -> Observation {
        let n = capacity.max(1) as usize;
        let mut minions = vec![MinionLoad::default(); n];
        minions[0].queued = queued;
        minions[0].in_flight = in_flight;
        Observation {
            capacity,
            minions,
            external: Vec::new(),
        }
    }

    fn run(p: &Policy, st: &mut PolicyState, o: &Observation, now: &str) -> Decision {
        evaluate(p, st, o, &Overrides::default(), t(now))
    }

    fn kinds(d: &Decision) -> Vec<ClipKind> {
        d.explanation.clips.iter().map(|c| c.kind).collect()
    }

    fn window(name: &str, spec: WindowSpec<'_>, min: Option<u32>, max: Option<u32>) -> Schedule {
        Schedule::new(&ScheduleSpec {
            name,
            timezone: "Europe/Berlin",
            window: spec,
            min,
            max,
            desired: None,
            priority: 0,
        })
        .expect("valid schedule")
    }

    const NIGHT: WindowSpec<'static> = WindowSpec::Weekly {
        days: "*",
        from: "20:00",
        to: "06:00",
    };

    #[test]
    fn the_highest_recommendation_wins_and_ties_go_to_the_first_rule() {
        let p = policy(
            0,
            100,
            vec![
                queue(10),
                Rule::Latency { target: secs(30) },
                Rule::External {
                    signal: "sqs".into(),
                    target_per_minion: 10,
                    activation: 0,
                },
                Rule::External {
                    signal: "kafka".into(),
                    target_per_minion: 1,
                    activation: 0,
                },
            ],
            free(),
            vec![],
        );
        let mut o = obs(2, 55, 5); // work 60: queue depth says 6
        o.minions[0].rate_per_s = Some(0.5); // 60 / (0.5 * 30) = 4
        o.external.push(ExternalSignal {
            name: "sqs".into(),
            value: 60, // 6, a tie with queue depth
        });
        let d = run(&p, &mut PolicyState::new(), &o, "2026-01-05T12:00:00Z");
        let recs: Vec<Option<u32>> = d
            .explanation
            .recommendations
            .iter()
            .map(|r| r.desired)
            .collect();
        assert_eq!(recs, [Some(6), Some(4), Some(6), None]);
        assert_eq!(d.explanation.source, Source::Rule(0));
        assert_eq!(
            d.explanation.recommendations[3].detail,
            "no value reported for kafka"
        );
        assert_eq!(d.desired, 6);
    }

    #[test]
    fn an_external_backlog_wakes_a_fleet_from_zero() {
        let p = policy(
            0,
            10,
            vec![
                queue(10),
                Rule::External {
                    signal: "sqs".into(),
                    target_per_minion: 100,
                    activation: 0,
                },
            ],
            Behaviour::default(),
            vec![],
        );
        let o = Observation {
            capacity: 0,
            minions: vec![],
            external: vec![ExternalSignal {
                name: "sqs".into(),
                value: 250,
            }],
        };
        let d = run(&p, &mut PolicyState::new(), &o, "2026-01-05T12:00:00Z");
        assert_eq!((d.desired, &d.explanation.source), (3, &Source::Rule(1)));
        assert!(d.explanation.clips.is_empty(), "zero has no tolerance band");

        // With an activation threshold, a backlog at or below it stays at 0.
        let p = policy(
            0,
            10,
            vec![Rule::External {
                signal: "sqs".into(),
                target_per_minion: 100,
                activation: 250,
            }],
            Behaviour::default(),
            vec![],
        );
        let d = run(&p, &mut PolicyState::new(), &o, "2026-01-05T12:00:00Z");
        assert_eq!(d.desired, 0);
        assert_eq!(
            d.explanation.recommendations[0].detail,
            "sqs 250 at or below its activation 250"
        );
        let mut above = o.clone();
        above.external[0].value = 251;
        let d = run(&p, &mut PolicyState::new(), &above, "2026-01-05T12:00:00Z");
        assert_eq!(d.desired, 3);
    }

    #[test]
    fn a_recommendation_within_the_tolerance_band_changes_nothing() {
        let b = Behaviour {
            tolerance: 0.1,
            ..free()
        };
        let p = policy(0, 100, vec![queue(1)], b, vec![]);
        let d = run(
            &p,
            &mut PolicyState::new(),
            &obs(20, 22, 0),
            "2026-01-05T12:00:00Z",
        );
        assert_eq!((d.desired, kinds(&d)), (20, vec![ClipKind::Tolerance]));
        let c = &d.explanation.clips[0];
        assert_eq!((c.before, c.after), (22, 20));
        assert_eq!(c.detail, "within ±10% of 20 (±2.0)");
        let d = run(
            &p,
            &mut PolicyState::new(),
            &obs(20, 18, 0),
            "2026-01-05T12:00:00Z",
        );
        assert_eq!(d.desired, 20);
        let d = run(
            &p,
            &mut PolicyState::new(),
            &obs(20, 23, 0),
            "2026-01-05T12:00:00Z",
        );
        assert_eq!((d.desired, kinds(&d)), (23, vec![]));
    }

    #[test]
    fn steps_limit_each_decision() {
        let b = Behaviour {
            max_step_out: 5,
            max_step_in: 2,
            ..free()
        };
        let p = policy(0, 100, vec![queue(1)], b, vec![]);
        let d = run(
            &p,
            &mut PolicyState::new(),
            &obs(2, 30, 0),
            "2026-01-05T12:00:00Z",
        );
        assert_eq!((d.desired, kinds(&d)), (7, vec![ClipKind::MaxStepOut]));
        let c = &d.explanation.clips[0];
        assert_eq!(
            (c.before, c.after, c.detail.as_str()),
            (30, 7, "at most +5 per decision")
        );
        let d = run(
            &p,
            &mut PolicyState::new(),
            &obs(10, 1, 0),
            "2026-01-05T12:00:00Z",
        );
        assert_eq!((d.desired, kinds(&d)), (8, vec![ClipKind::MaxStepIn]));
    }

    #[test]
    fn a_scale_out_is_sized_for_what_arrives_and_waits_not_for_the_backlog_alone() {
        let p = policy(0, 1000, vec![queue(3)], free(), vec![]);
        let fleet = |capacity: u32, queued: u64, rate: f64| Observation {
            capacity,
            minions: vec![
                MinionLoad {
                    queued,
                    in_flight: 4,
                    rate_per_s: Some(rate),
                };
                2
            ],
            external: Vec::new(),
        };
        let mut st = PolicyState::new();
        // Two busy minions serve 100 msg/s each, with 28 messages of work.
        let d = run(&p, &mut st, &fleet(2, 10, 100.0), "2026-11-23T10:00:00Z");
        assert_eq!(d.desired, 10, "no growth known yet: the rule alone");
        assert_eq!(kinds(&d), []);
        // Ten seconds later the work grew by 1,500: 150 msg/s more arrive
        // than the two serve, 350 msg/s. The rule wants 510 minions; 4
        // serve 350 msg/s and clear 1,528 within a minute (350/100 + 1528/60
        // /100 = 3.75); with 8 already there (six booting), none is added.
        let d = run(&p, &mut st, &fleet(8, 760, 100.0), "2026-11-23T10:00:10Z");
        assert_eq!(d.desired, 8, "{:?}", d.explanation.clips);
        assert_eq!(kinds(&d), [ClipKind::ArrivalRate]);
        let detail = &d.explanation.clips[0].detail;
        assert_eq!(
            detail,
            "4 minions at 100.0 msg/s serve 350 msg/s arriving (+0%) and clear 1528 queued+in-flight within 1m; 6 of the 8 still booting"
        );
        // Two minions, nothing booting: 4 are launched, not 510.
        let mut st = PolicyState::new();
        run(&p, &mut st, &fleet(2, 10, 100.0), "2026-11-23T10:00:00Z");
        let d = run(&p, &mut st, &fleet(2, 760, 100.0), "2026-11-23T10:00:10Z");
        assert_eq!(d.desired, 4, "{:?}", d.explanation.clips);
        // Without reported rates, or with nothing queued (minions that are
        // not busy under-report what they can do), the rule alone.
        let mut st = PolicyState::new();
        run(&p, &mut st, &obs(2, 20, 8), "2026-11-23T10:00:00Z");
        let d = run(&p, &mut st, &obs(2, 1520, 8), "2026-11-23T10:00:10Z");
        assert_eq!(d.desired, 510);
    }

    #[test]
    fn no_scale_in_below_what_the_arrivals_need_at_the_learned_rate() {
        // A backlog target above what a minion holds at full load (4 busy
        // connections): a fleet that keeps up shows 4 per minion and reads
        // as too big.
        let p = policy(0, 100, vec![queue(8)], free(), vec![]);
        let fleet = |n: usize, queued: u64, in_flight: u64, rate: f64| Observation {
            capacity: n as u32,
            minions: vec![
                MinionLoad {
                    queued,
                    in_flight,
                    rate_per_s: Some(rate),
                };
                n
            ],
            external: Vec::new(),
        };
        let mut st = PolicyState::new();
        assert_eq!(st.service_rate(), None);
        // Idle-ish minions say nothing about what one can do.
        run(&p, &mut st, &fleet(5, 0, 1, 20.0), "2026-11-23T10:00:00Z");
        assert_eq!(st.service_rate(), None);
        // Busy ones (a queue) do: 100 msg/s each.
        run(&p, &mut st, &fleet(5, 2, 4, 100.0), "2026-11-23T10:00:10Z");
        assert_eq!(st.service_rate(), Some(100.0));
        // Five minions keep up with 450 msg/s, 4 in flight each, no queue:
        // the rule wants 3 (20 / 8), but 450 msg/s needs 5.
        let d = run(&p, &mut st, &fleet(5, 0, 4, 90.0), "2026-11-23T10:00:20Z");
        assert_eq!(d.desired, 5, "{:?}", d.explanation.clips);
        assert_eq!(kinds(&d), [ClipKind::ArrivalRate]);
        assert_eq!(
            d.explanation.clips[0].detail,
            "5 minions at 100.0 msg/s (learned while busy) serve the 450 msg/s arriving (+0%)"
        );
        // When the load falls the fleet shrinks to what it needs.
        let d = run(&p, &mut st, &fleet(5, 0, 1, 30.0), "2026-11-23T10:00:30Z");
        assert_eq!(d.desired, 2, "150 msg/s: {:?}", d.explanation.clips);
        // A rate above the learned one raises it; a lower one without a
        // queue does not lower it.
        run(&p, &mut st, &fleet(2, 0, 4, 120.0), "2026-11-23T10:00:40Z");
        assert_eq!(st.service_rate(), Some(120.0));
        run(&p, &mut st, &fleet(2, 0, 1, 10.0), "2026-11-23T10:00:50Z");
        assert_eq!(st.service_rate(), Some(120.0));
    }

    #[test]
    fn cooldowns_count_from_the_last_change_in_the_same_direction() {
        let b = Behaviour {
            scale_out_cooldown: secs(60),
            scale_in_cooldown: secs(120),
            ..free()
        };
        let p = policy(0, 100, vec![queue(1)], b, vec![]);
        let mut st = PolicyState::new();
        assert_eq!(
            run(&p, &mut st, &obs(2, 4, 0), "2026-01-05T12:00:00Z").desired,
            4
        );
        assert_eq!(st.last_scale_out(), Some(t("2026-01-05T12:00:00Z")));
        let d = run(&p, &mut st, &obs(4, 6, 0), "2026-01-05T12:00:30Z");
        assert_eq!(
            (d.desired, kinds(&d)),
            (4, vec![ClipKind::ScaleOutCooldown])
        );
        // A scale-in right after a scale-out is not held by the scale-in cooldown.
        assert_eq!(
            run(&p, &mut st, &obs(4, 3, 0), "2026-01-05T12:00:40Z").desired,
            3
        );
        let d = run(&p, &mut st, &obs(3, 1, 0), "2026-01-05T12:01:00Z");
        assert_eq!((d.desired, kinds(&d)), (3, vec![ClipKind::ScaleInCooldown]));
        assert_eq!(
            run(&p, &mut st, &obs(3, 8, 0), "2026-01-05T12:01:01Z").desired,
            8
        );
        assert_eq!(
            run(&p, &mut st, &obs(8, 1, 0), "2026-01-05T12:02:40Z").desired,
            1
        );
    }

    #[test]
    fn stabilization_holds_the_peak_for_the_window() {
        let b = Behaviour {
            scale_in_stabilization: secs(300),
            ..free()
        };
        let p = policy(1, 100, vec![queue(1)], b, vec![]);
        let mut st = PolicyState::new();
        assert_eq!(
            run(&p, &mut st, &obs(2, 10, 0), "2026-01-05T12:00:00Z").desired,
            10
        );
        let d = run(&p, &mut st, &obs(10, 3, 0), "2026-01-05T12:04:59Z");
        assert_eq!((d.desired, kinds(&d)), (10, vec![ClipKind::Stabilization]));
        assert_eq!(
            d.explanation.clips[0].detail,
            "highest recommendation over the last 5m was 10 at 2026-01-05T12:00:00Z"
        );
        let d = run(&p, &mut st, &obs(10, 0, 0), "2026-01-05T12:05:01Z");
        // The peak left the window; 3 at 12:04:59 is the highest now.
        assert_eq!((d.desired, kinds(&d)), (3, vec![ClipKind::Stabilization]));
    }

    #[test]
    fn a_restarted_controller_keeps_the_size_it_found_for_a_window() {
        let b = Behaviour {
            scale_in_stabilization: secs(300),
            ..free()
        };
        let p = policy(1, 100, vec![queue(1)], b, vec![]);
        let mut st = PolicyState::new();
        st.record_recommendation(t("2026-01-05T12:00:00Z"), 8);
        let d = run(&p, &mut st, &obs(8, 0, 0), "2026-01-05T12:01:00Z");
        assert_eq!((d.desired, kinds(&d)), (8, vec![ClipKind::Stabilization]));
        let d = run(&p, &mut st, &obs(8, 0, 0), "2026-01-05T12:05:01Z");
        assert_eq!(d.desired, 1);
    }

    #[test]
    fn in_flight_work_keeps_its_minions_past_step_limits_within_max() {
        let b = Behaviour {
            max_step_out: 3,
            ..free()
        };
        let p = policy(0, 100, vec![queue(10)], b.clone(), vec![]);
        let d = run(
            &p,
            &mut PolicyState::new(),
            &obs(2, 0, 100),
            "2026-01-05T12:00:00Z",
        );
        assert_eq!(
            (d.desired, kinds(&d)),
            (10, vec![ClipKind::MaxStepOut, ClipKind::InFlightFloor])
        );
        let p = policy(0, 8, vec![queue(10)], b, vec![]);
        let d = run(
            &p,
            &mut PolicyState::new(),
            &obs(2, 0, 100),
            "2026-01-05T12:00:00Z",
        );
        assert_eq!(d.desired, 8);
        assert_eq!(kinds(&d).last(), Some(&ClipKind::FleetMax));
    }

    #[test]
    fn a_window_overrides_the_fleet_bounds_but_not_beyond_its_max() {
        let night = window("night", NIGHT, None, Some(2));
        let p = policy(3, 20, vec![queue(1)], free(), vec![night]);
        let at_night = "2026-01-05T22:00:00Z"; // 23:00 in Berlin
        let d = run(&p, &mut PolicyState::new(), &obs(10, 15, 0), at_night);
        assert_eq!((d.desired, kinds(&d)), (2, vec![ClipKind::ScheduleMax]));
        // The fleet's min 3 yields to the window's max 2.
        let d = run(&p, &mut PolicyState::new(), &obs(1, 0, 0), at_night);
        assert_eq!((d.desired, kinds(&d)), (2, vec![ClipKind::FleetMin]));
        assert_eq!(
            d.explanation.clips[0].detail,
            "fleet min 3 lowered to the window's max 2"
        );
        // By day the fleet's bounds are back.
        let d = run(
            &p,
            &mut PolicyState::new(),
            &obs(10, 15, 0),
            "2026-01-05T12:00:00Z",
        );
        assert_eq!(d.desired, 15);

        let busy = window("busy", NIGHT, Some(5), Some(50));
        let p = policy(0, 20, vec![queue(1)], free(), vec![busy]);
        let d = run(&p, &mut PolicyState::new(), &obs(10, 40, 0), at_night);
        assert_eq!((d.desired, kinds(&d)), (20, vec![ClipKind::FleetMax]));
        let d = run(&p, &mut PolicyState::new(), &obs(10, 0, 0), at_night);
        assert_eq!((d.desired, kinds(&d)), (5, vec![ClipKind::ScheduleMin]));
    }

    #[test]
    fn a_window_with_a_fixed_size_skips_behaviour() {
        let off = Schedule::new(&ScheduleSpec {
            name: "dev off",
            timezone: "Europe/Berlin",
            window: NIGHT,
            min: None,
            max: None,
            desired: Some(0),
            priority: 0,
        })
        .expect("valid");
        let b = Behaviour::default();
        let p = policy(1, 10, vec![queue(1)], b, vec![off]);
        let d = run(
            &p,
            &mut PolicyState::new(),
            &obs(6, 9, 0),
            "2026-01-05T22:00:00Z",
        );
        assert_eq!((d.desired, kinds(&d)), (0, vec![]));
        assert_eq!(d.explanation.source, Source::Schedule("dev off".into()));
    }

    #[test]
    fn a_window_applies_at_the_first_evaluation_after_an_outage() {
        let night = window("night", NIGHT, None, Some(2));
        let p = policy(1, 20, vec![queue(1)], Behaviour::default(), vec![night]);
        let mut st = PolicyState::new();
        // Busy afternoon, then the controller is down from 14:00 to 20:05.
        assert_eq!(
            run(&p, &mut st, &obs(4, 8, 0), "2026-01-05T12:00:00Z").desired,
            8
        );
        assert_eq!(
            run(&p, &mut st, &obs(8, 8, 0), "2026-01-05T13:00:00Z").desired,
            8
        );
        let d = run(&p, &mut st, &obs(8, 8, 0), "2026-01-05T19:05:00Z"); // 20:05 Berlin
        assert_eq!(d.desired, 2);
        assert_eq!(kinds(&d), vec![ClipKind::ScheduleMax]);
        let w = d.explanation.window.expect("night is active");
        assert_eq!(w.opened, t("2026-01-05T19:00:00Z"));
    }

    #[test]
    fn a_pin_holds_until_it_expires_and_then_says_so() {
        let night = window("night", NIGHT, None, Some(2));
        let p = policy(1, 20, vec![queue(1)], Behaviour::default(), vec![night]);
        let pin = Pin {
            desired: 7,
            until: Some(t("2026-01-05T23:00:00Z")),
        };
        let pinned = Overrides {
            paused: false,
            pin: Some(pin),
        };
        let mut st = PolicyState::new();
        let d = evaluate(
            &p,
            &mut st,
            &obs(3, 0, 0),
            &pinned,
            t("2026-01-05T22:00:00Z"),
        );
        assert_eq!(
            (d.desired, kinds(&d)),
            (7, vec![]),
            "the pin outranks the window"
        );
        assert_eq!(d.explanation.pin, PinStatus::Active(pin));
        let d = evaluate(
            &p,
            &mut st,
            &obs(7, 0, 0),
            &pinned,
            t("2026-01-05T23:00:00Z"),
        );
        assert_eq!(d.explanation.pin, PinStatus::Expired(pin));
        assert_eq!(d.desired, 2);
        assert!(
            d.explanation
                .to_string()
                .contains("overrides: pin at 7 expired at 2026-01-05T23:00:00Z, ignored")
        );
        let huge = Overrides {
            paused: false,
            pin: Some(Pin {
                desired: 50,
                until: None,
            }),
        };
        let d = evaluate(&p, &mut st, &obs(7, 0, 0), &huge, t("2026-01-05T23:00:00Z"));
        assert_eq!((d.desired, kinds(&d)), (20, vec![ClipKind::FleetMax]));
    }

    #[test]
    fn a_paused_fleet_is_explained_but_not_applied() {
        let p = policy(1, 20, vec![queue(1)], Behaviour::default(), vec![]);
        let mut st = PolicyState::new();
        let paused = Overrides {
            paused: true,
            pin: None,
        };
        let d = evaluate(
            &p,
            &mut st,
            &obs(2, 9, 0),
            &paused,
            t("2026-01-05T12:00:00Z"),
        );
        assert_eq!((d.desired, d.applied), (9, false));
        assert_eq!(st.last_scale_out(), None, "nothing changed, no cooldown");
        assert!(
            d.explanation
                .to_string()
                .starts_with("desired 9 (from 2), paused, not applied\n")
        );
    }

    #[test]
    fn explanation_reads_well() {
        let night = Schedule::new(&ScheduleSpec {
            name: "night",
            timezone: "America/Detroit",
            window: WindowSpec::Weekly {
                days: "mon-fri",
                from: "19:00",
                to: "07:00",
            },
            min: Some(1),
            max: Some(6),
            desired: None,
            priority: 10,
        })
        .expect("valid");
        let b = Behaviour {
            max_step_out: 4,
            ..Behaviour::default()
        };
        let rules = vec![
            queue(10),
            Rule::Latency { target: secs(30) },
            Rule::External {
                signal: "sqs".into(),
                target_per_minion: 10,
                activation: 0,
            },
        ];
        let p = policy(2, 20, rules, b, vec![night]);
        let o = Observation {
            capacity: 3,
            minions: vec![
                MinionLoad {
                    queued: 30,
                    in_flight: 4,
                    rate_per_s: Some(3.0),
                },
                MinionLoad {
                    queued: 10,
                    in_flight: 2,
                    rate_per_s: Some(1.0),
                },
                MinionLoad {
                    queued: 0,
                    in_flight: 0,
                    rate_per_s: None,
                },
            ],
            external: vec![ExternalSignal {
                name: "sqs".into(),
                value: 120,
            }],
        };
        let overrides = Overrides {
            paused: false,
            pin: Some(Pin {
                desired: 9,
                until: Some(t("2026-01-06T00:00:00Z")),
            }),
        };
        // Tuesday 20:30 in Detroit.
        let d = evaluate(
            &p,
            &mut PolicyState::new(),
            &o,
            &overrides,
            t("2026-01-07T01:30:00Z"),
        );
        let golden = "\
desired 6 (from 3), applied
inputs at 2026-01-07T01:30:00Z:
  load: 3 minions, 40 queued, 6 in flight, 4.0 msg/s from 2 reporting
  rates: not known yet arriving, 2.0 msg/s per minion at full load
  external: sqs=120
  window: night (priority 10, opened 2026-01-06 19:00 America/Detroit = 2026-01-07T00:00:00Z): min 1, max 6
  overrides: pin at 9 expired at 2026-01-06T00:00:00Z, ignored
rules:
  queue depth: 5 (queued+in-flight 46 / 10 per minion)
  latency: 1 (queued+in-flight 46 at 2.0 msg/s per minion within 30s)
* external sqs: 12 (sqs 120 / 10 per minion)
  forecast (only): no recommendation (history covers 0s of the 24h needed)
target 12 from external sqs
clips:
  max step out: 12 → 7 (at most +4 per decision)
  schedule max: 7 → 6 (window night max 6)
desired: 6";
        assert_eq!(d.explanation.to_string(), golden);
    }

    #[test]
    fn bad_policies_name_the_key() {
        let b = Bounds::new(0, 4).expect("bounds");
        let err = |rules, behaviour, schedules| {
            Policy::new(b, rules, behaviour, schedules).expect_err("invalid")
        };
        let e = err(vec![queue(5), queue(0)], Behaviour::default(), vec![]);
        assert_eq!(
            (e.path(), e.to_string()),
            (
                "rules[1].target_per_minion".into(),
                "target must be at least 1".into()
            )
        );
        let e = err(
            vec![Rule::Latency {
                target: Duration::ZERO,
            }],
            Behaviour::default(),
            vec![],
        );
        assert_eq!(e.path(), "rules[0].target");
        let e = err(
            vec![],
            Behaviour {
                tolerance: 1.5,
                ..Behaviour::default()
            },
            vec![],
        );
        assert_eq!(e.path(), "behaviour.tolerance");
        let e = err(
            vec![],
            Behaviour {
                clear_backlog_within: Duration::ZERO,
                ..Behaviour::default()
            },
            vec![],
        );
        assert_eq!(e.path(), "behaviour.clear_backlog_within");
        let e = err(
            vec![],
            Behaviour {
                max_step_in: 0,
                ..Behaviour::default()
            },
            vec![],
        );
        assert_eq!(e.path(), "behaviour.max_step_in");
        let w = window("w", NIGHT, Some(5), None);
        let e = err(vec![], Behaviour::default(), vec![w]);
        assert_eq!(
            (e.path(), e.to_string()),
            (
                "schedules[0].min".into(),
                "5 is above the fleet's max 4".into()
            )
        );
        let a = window("a", NIGHT, None, Some(1));
        let e = err(vec![], Behaviour::default(), vec![a.clone(), a]);
        assert_eq!(e.path(), "schedules[1].name");
    }

    #[test]
    fn no_rules_hold_the_current_size_within_bounds() {
        let p = policy(2, 5, vec![], Behaviour::default(), vec![]);
        let d = run(
            &p,
            &mut PolicyState::new(),
            &obs(4, 100, 0),
            "2026-01-05T12:00:00Z",
        );
        assert_eq!(
            (d.desired, &d.explanation.source),
            (4, &Source::NoRecommendation)
        );
        let d = run(
            &p,
            &mut PolicyState::new(),
            &obs(0, 0, 0),
            "2026-01-05T12:00:00Z",
        );
        assert_eq!((d.desired, kinds(&d)), (2, vec![ClipKind::FleetMin]));
    }

    fn behaviour_strategy() -> impl Strategy<Value = Behaviour> {
        (1u32..8, 1u32..8, 0u64..300, 0u64..300, 0u64..900, 0u32..5).prop_map(
            |(out, inn, oc, ic, stab, tol)| Behaviour {
                max_step_out: out,
                max_step_in: inn,
                scale_out_cooldown: secs(oc),
                scale_in_cooldown: secs(ic),
                scale_in_stabilization: secs(stab),
                tolerance: f64::from(tol) / 10.0,
                clear_backlog_within: DEFAULT_CLEAR_BACKLOG_WITHIN,
                ..Behaviour::default()
            },
        )
    }

    /// One evaluation step: seconds since the last, queued, in flight.
    fn steps_strategy() -> impl Strategy<Value = Vec<(u64, u64, u64)>> {
        proptest::collection::vec((0u64..7_200, 0u64..400, 0u64..200), 1..40)
    }

    proptest! {
        #[test]
        fn desired_is_always_within_the_active_bounds(
            min in 0u32..10, extra in 0u32..30, target in 1u32..20,
            b in behaviour_strategy(),
            win in proptest::option::of((0i8..24, 0i8..24, proptest::option::of(0u32..10), proptest::option::of(0u32..40))),
            steps in steps_strategy(),
            paused: bool,
        ) {
            let fleet = Bounds::new(min, min + extra).expect("bounds");
            let mut schedules = Vec::new();
            if let Some((from, to, wmin, wmax)) = win {
                let wmin = wmin.map(|m| m.min(fleet.max));
                let wmax = wmax.map(|m| m.max(wmin.unwrap_or(0)));
                prop_assume!(wmin.is_some() || wmax.is_some());
                let (from, to) = (format!("{from:02}:00"), format!("{to:02}:00"));
                schedules.push(window("w", WindowSpec::Weekly { days: "mon-fri", from: &from, to: &to }, wmin, wmax));
            }
            let p = Policy::new(fleet, vec![queue(target)], b, schedules).expect("valid");
            let mut st = PolicyState::new();
            let mut now = t("2026-03-27T00:00:00Z");
            let mut capacity = 0;
            let overrides = Overrides { paused, pin: None };
            for (dt, q, f) in steps {
                now += jiff::SignedDuration::from_secs(dt as i64);
                let o = Observation { capacity, ..obs(capacity, q, f) };
                let d = evaluate(&p, &mut st, &o, &overrides, now);
                let (lo, hi) = match active_window(p.schedules(), now) {
                    Some(w) => {
                        let hi = w.max.unwrap_or(fleet.max).min(fleet.max);
                        (w.min.unwrap_or(fleet.min).min(hi), hi)
                    }
                    None => (fleet.min, fleet.max),
                };
                prop_assert!(lo <= d.desired && d.desired <= hi, "{} not in {}..={}\n{}", d.desired, lo, hi, d.explanation);
                if d.applied {
                    capacity = d.desired;
                }
            }
        }

        #[test]
        fn never_fewer_minions_than_in_flight_work_needs(
            max in 0u32..60, target in 1u32..20,
            b in behaviour_strategy(),
            steps in steps_strategy(),
        ) {
            let p = policy(0, max, vec![queue(target)], b, vec![]);
            let mut st = PolicyState::new();
            let mut now = t("2026-03-27T00:00:00Z");
            let mut capacity = 0;
            for (dt, q, f) in steps {
                now += jiff::SignedDuration::from_secs(dt as i64);
                let d = evaluate(&p, &mut st, &obs(capacity, q, f), &Overrides::default(), now);
                let need = u32::try_from(f.div_ceil(u64::from(target))).expect("small");
                prop_assert!(d.desired >= need.min(max), "{}", d.explanation);
                capacity = d.desired;
            }
        }

        #[test]
        fn no_scale_in_below_a_peak_inside_the_window(
            max in 1u32..60, target in 1u32..20,
            b in behaviour_strategy(),
            steps in proptest::collection::vec((0u64..400, 0u64..400, 0u64..50), 1..60),
        ) {
            let window = b.scale_in_stabilization;
            let p = policy(0, max, vec![queue(target)], b, vec![]);
            let mut st = PolicyState::new();
            let mut now = t("2026-03-27T00:00:00Z");
            let mut capacity = 0;
            let mut seen: Vec<(Timestamp, u32)> = Vec::new();
            for (dt, q, f) in steps {
                now += jiff::SignedDuration::from_secs(dt as i64);
                let raw = u32::try_from((q + f).div_ceil(u64::from(target))).expect("small");
                seen.push((now, raw));
                let d = evaluate(&p, &mut st, &obs(capacity, q, f), &Overrides::default(), now);
                if d.desired < capacity {
                    let peak = seen
                        .iter()
                        .filter(|(at, _)| elapsed(*at, now) <= window)
                        .map(|&(_, v)| v)
                        .max()
                        .unwrap_or(raw);
                    prop_assert!(d.desired >= peak.min(max), "scaled in to {} under peak {}\n{}", d.desired, peak, d.explanation);
                }
                capacity = d.desired;
            }
        }
    }

    /// `rate` msg/s arriving at a fleet that keeps up: as many minions as
    /// serve it at 100 msg/s, each reporting its share, nothing queued.
    fn serving(rate: f64) -> Observation {
        let n = (rate / 100.0).ceil().max(1.0) as u32;
        Observation {
            capacity: n,
            minions: vec![
                MinionLoad {
                    queued: 0,
                    in_flight: 0,
                    rate_per_s: Some(rate / f64::from(n)),
                };
                n as usize
            ],
            external: Vec::new(),
        }
    }

    /// 100 msg/s at night, 1,000 from 08:00 to 18:00 UTC.
    fn office_hours(at: Timestamp) -> f64 {
        let hour = at.as_second().rem_euclid(86_400) / 3600;
        if (8..18).contains(&hour) {
            1000.0
        } else {
            100.0
        }
    }

    /// A policy with the forecast in `mode`, and a state that saw one day
    /// of office hours, evaluated every minute from 2026-11-02T00:00Z.
    fn a_day_of_office_hours(mode: ForecastMode) -> (Policy, PolicyState) {
        let b = Behaviour {
            forecast: mode,
            service_rate: Some(100.0),
            ..free()
        };
        let p = policy(1, 50, vec![queue(10)], b, vec![]);
        let mut st = PolicyState::new();
        let start = t("2026-11-02T00:00:00Z");
        for minute in 0..24 * 60 {
            let now = start.checked_add(Duration::from_secs(minute * 60)).unwrap();
            evaluate(
                &p,
                &mut st,
                &serving(office_hours(now)),
                &Overrides::default(),
                now,
            );
        }
        (p, st)
    }

    #[test]
    fn the_forecast_launches_one_boot_ahead_of_a_rise_it_saw_yesterday() {
        let (p, mut st) = a_day_of_office_hours(ForecastMode::On);
        // 07:50, night: the forecast asks for the night's 100 msg/s: 1 minion.
        let d = run(&p, &mut st, &serving(100.0), "2026-11-03T07:50:00Z");
        assert_eq!(d.desired, 1, "{}", d.explanation);
        // 07:58:30: one boot ahead is 08:00:30, when yesterday ran 1,000
        // msg/s: the fleet launches for it before the first message.
        let d = run(&p, &mut st, &serving(100.0), "2026-11-03T07:58:30Z");
        assert_eq!(d.desired, 10, "{}", d.explanation);
        assert_eq!(d.explanation.source_name(), "forecast");
        let text = d.explanation.to_string();
        assert!(
            text.contains("* forecast: 10 (1000 msg/s expected from 2026-11-03T08:00:30Z (one boot ahead; a day before 1000 x1.00 lately, a week before none)"),
            "{text}"
        );
    }

    #[test]
    fn forecast_only_explains_and_changes_nothing() {
        let (p, mut st) = a_day_of_office_hours(ForecastMode::Only);
        let d = run(&p, &mut st, &serving(100.0), "2026-11-03T07:58:30Z");
        assert_eq!(d.desired, 1, "{}", d.explanation);
        assert_eq!(d.explanation.source_name(), "queue depth");
        let f = d.explanation.recommendations.last().unwrap();
        assert_eq!((f.rule.as_str(), f.desired), ("forecast (only)", None));
        assert!(
            f.detail.starts_with("forecast only, not acted on: would raise the target from 0 to 10; 1000 msg/s expected"),
            "{}",
            f.detail
        );
    }

    #[test]
    fn never_scales_in_on_a_forecast_alone() {
        let (p, mut st) = a_day_of_office_hours(ForecastMode::On);
        // 17:59: the evening is forecast, but the fleet's only rule reads
        // an SQS queue that did not answer, so no rule says anything: the
        // fleet keeps its 10.
        let sqs = Rule::External {
            signal: "sqs".to_owned(),
            target_per_minion: 10,
            activation: 0,
        };
        let p = policy(1, 50, vec![sqs], p.behaviour().clone(), vec![]);
        let d = run(&p, &mut st, &serving(1000.0), "2026-11-03T17:59:00Z");
        assert_eq!(d.desired, 10, "{}", d.explanation);
        assert_eq!(d.explanation.source, Source::NoRecommendation);
        let f = d.explanation.recommendations.last().unwrap();
        assert!(
            f.detail
                .ends_with("no rule recommends, so it does not lower the size"),
            "{}",
            f.detail
        );
    }

    #[test]
    fn the_forecast_waits_for_its_minimum_history() {
        let b = Behaviour {
            forecast: ForecastMode::On,
            service_rate: Some(100.0),
            forecast_min_history: Duration::from_secs(48 * 3600),
            ..free()
        };
        let (_, mut st) = a_day_of_office_hours(ForecastMode::On);
        let p = policy(1, 50, vec![queue(10)], b, vec![]);
        let d = run(&p, &mut st, &serving(100.0), "2026-11-03T07:58:30Z");
        assert_eq!(d.desired, 1, "{}", d.explanation);
        let f = d.explanation.recommendations.last().unwrap();
        assert_eq!(f.detail, "history covers 31h58m30s of the 48h needed");
    }

    /// Evaluates every 10 s for `minutes`, the queue (target 1 per minion)
    /// asking for `need(minute)` minions; the fleet follows every decision.
    fn drive(
        p: &Policy,
        st: &mut PolicyState,
        from: Timestamp,
        minutes: u64,
        need: impl Fn(u64) -> u64,
    ) -> (u32, Vec<Decision>) {
        let mut capacity = 1;
        let mut decisions = Vec::new();
        for step in 0..minutes * 6 {
            let now = from.checked_add(Duration::from_secs(step * 10)).unwrap();
            let d = evaluate(
                p,
                st,
                &obs(capacity, need(step / 6), 0),
                &Overrides::default(),
                now,
            );
            capacity = d.desired;
            decisions.push(d);
        }
        (capacity, decisions)
    }

    /// A queue rule of 1 per minion with the hold looking 2m30s ahead.
    fn holding() -> Policy {
        let b = Behaviour {
            break_even_hold: true,
            hold_within: Duration::from_secs(150),
            ..free()
        };
        policy(1, 50, vec![queue(1)], b, vec![])
    }

    #[test]
    fn the_break_even_hold_keeps_minions_a_recurring_need_will_want_again() {
        let p = holding();
        let start = t("2026-11-02T00:00:00Z");
        // 6 minions needed one minute in three: each gap (2 minutes) is
        // within hold_within (2m30s here), so after the first half hour
        // the fleet keeps its 6 through the gaps.
        let mut st = PolicyState::new();
        let (_, ds) = drive(&p, &mut st, start, 60, |m| if m % 3 == 0 { 6 } else { 1 });
        let late = &ds[40 * 6..];
        assert!(
            late.iter().all(|d| d.desired == 6),
            "{:?}",
            late.iter().map(|d| d.desired).collect::<Vec<_>>()
        );
        let held = late
            .iter()
            .find(|d| kinds(d).contains(&ClipKind::BreakEvenHold))
            .expect("held");
        let clip = held
            .explanation
            .clips
            .iter()
            .find(|c| c.kind == ClipKind::BreakEvenHold)
            .unwrap();
        assert!(
            clip.detail
                .starts_with("6 minions were needed again within 2m30s (hold_within) after"),
            "{}",
            clip.detail
        );
        // Early on it has too little past to go on: the first gaps scale in.
        assert!(ds[..10 * 6].iter().any(|d| d.desired == 1));

        // The same need one minute in twenty: idle minions are not kept.
        let mut st = PolicyState::new();
        let (_, ds) = drive(&p, &mut st, start, 60, |m| if m % 20 == 0 { 6 } else { 1 });
        assert!(
            ds.iter()
                .all(|d| !kinds(d).contains(&ClipKind::BreakEvenHold))
        );
        assert_eq!(ds.last().unwrap().desired, 1);
    }

    #[test]
    fn the_hold_survives_a_restart() {
        let p = holding();
        let start = t("2026-11-02T00:00:00Z");
        let mut st = PolicyState::new();
        drive(&p, &mut st, start, 60, |m| if m % 3 == 0 { 6 } else { 1 });
        let mut back = PolicyState::from_memory(st.memory());
        // The first gap minute after the restart: still held.
        let d = run(&p, &mut back, &obs(6, 1, 0), "2026-11-02T01:00:10Z");
        assert_eq!(d.desired, 6, "{}", d.explanation);
        assert!(kinds(&d).contains(&ClipKind::BreakEvenHold));
    }

    #[test]
    fn the_rate_rule_launches_only_for_work_still_waiting_when_a_launch_is_ready() {
        let rule = Rule::Arrivals { utilization: 0.9 };
        let b = Behaviour::default();
        let load = LoadSummary {
            minions: 4,
            queued: 5000,
            in_flight: 0,
            rate_per_s: 400.0,
            rate_reporters: 4,
        };
        let inputs = |capacity| Inputs {
            load: &load,
            external: &[],
            arrivals: Some(300.0),
            service_rate: Some(100.0),
            capacity,
            behaviour: &b,
        };
        // Four minions clear 5,000 queued at 100 msg/s to spare long
        // before a boot (2m): no launch, only the arrivals at 90 %.
        let r = rule.recommend(&inputs(4));
        assert_eq!(r.desired, Some(4), "{}", r.detail);
        assert_eq!(
            r.detail,
            "300 msg/s arriving at 100.0 msg/s per minion and 90% utilization: 3.3; 0 of the 5000 queued+in-flight still waiting one boot (2m) from now, on 4 minions, cleared within 1m: +0.0"
        );
        // Two fall behind by 100 msg/s: 17,000 will wait, 2.8 minions'
        // worth within a minute.
        let r = rule.recommend(&inputs(2));
        assert_eq!(r.desired, Some(7), "{}", r.detail);
        // Nothing to go on yet.
        let none = Inputs {
            arrivals: None,
            ..inputs(2)
        };
        assert_eq!(rule.recommend(&none).desired, None);
        let none = Inputs {
            service_rate: None,
            ..inputs(2)
        };
        assert_eq!(rule.recommend(&none).detail, NO_SERVICE_RATE);
        // A utilization outside (0, 1] is refused with its rule.
        let e = Policy::new(
            Bounds::new(0, 5).unwrap(),
            vec![queue(1), Rule::Arrivals { utilization: 1.5 }],
            Behaviour::default(),
            vec![],
        )
        .unwrap_err();
        assert_eq!(
            (e.path(), e.rule()),
            ("rules[1].utilization".to_owned(), Some(1))
        );
    }

    #[test]
    fn the_service_rate_starts_at_its_prior_and_learns_only_from_busy_minions() {
        let b = Behaviour {
            service_rate: Some(50.0),
            ..free()
        };
        let p = policy(0, 50, vec![queue(10)], b, vec![]);
        let mut st = PolicyState::new();
        let at = |s: u64| {
            t("2026-11-25T10:00:00Z")
                .checked_add(Duration::from_secs(s))
                .unwrap()
        };
        let load = |queued: u64, rate: f64| Observation {
            capacity: 2,
            minions: vec![
                MinionLoad {
                    queued,
                    in_flight: 1,
                    rate_per_s: Some(rate),
                };
                2
            ],
            external: Vec::new(),
        };
        // Idle minions processing 20 msg/s say nothing about what they
        // could do: the prior stands.
        let d = evaluate(&p, &mut st, &load(0, 20.0), &Overrides::default(), at(0));
        assert_eq!(d.explanation.service_rate, Some(50.0));
        // Busy ones at 100 pull it a fifth of the way each evaluation...
        let d = evaluate(&p, &mut st, &load(30, 100.0), &Overrides::default(), at(10));
        assert_eq!(d.explanation.service_rate, Some(60.0));
        for s in 2..40 {
            evaluate(
                &p,
                &mut st,
                &load(30, 100.0),
                &Overrides::default(),
                at(s * 10),
            );
        }
        let learned = st.service_rate().unwrap();
        assert!((learned - 100.0).abs() < 0.1, "{learned}");
        // ...and idle ones below it never lower it; above it, they raise it.
        evaluate(&p, &mut st, &load(0, 30.0), &Overrides::default(), at(400));
        assert!((st.service_rate().unwrap() - learned).abs() < 1e-9);
        evaluate(&p, &mut st, &load(0, 130.0), &Overrides::default(), at(410));
        assert_eq!(st.service_rate(), Some(130.0));
        // The arrivals: processed plus the growth of the work since the
        // last evaluation (30 queued + 1 in flight each, 10 s before: 0 + 1).
        let d = evaluate(
            &p,
            &mut st,
            &load(30, 100.0),
            &Overrides::default(),
            at(420),
        );
        assert_eq!(d.explanation.arrivals_per_s, Some(200.0 + 60.0 / 10.0));
    }
}
