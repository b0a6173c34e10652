//! `gru sim`: replays a traffic trace against a scaler on a virtual clock.
//!
//! The fleet model is deliberately simple and the same for every scaler, so
//! their results compare: messages arrive at the trace's rate, in-service
//! minions serve `service_rate` messages per second each, the rest queues
//! (fleet-wide, as the load balancer spreads it). A launched minion serves
//! after `boot_time`; a drained one stops taking work at once and is billed
//! for `drain_time` more. The scaler sees what minions would report at each
//! evaluation: capacity, queued and in-flight work, processing rate.
//!
//! With [`Model::connections`] set, senders hold that many long-lived
//! connections, and a minion serves only through the connections it holds:
//! up to `service_rate` once it holds `slots_per_minion` of them, in
//! proportion below that. A minion that goes in service holds none; senders
//! move onto it as the load balancer (least connections) places their
//! reconnects: after `max_connection_age` (jittered, 1.5× on average), after
//! a drain, and, for a scaler that rebalances ([`Scaler::rebalance`]), when
//! gru's own rebalancing ([`crate::rebalance`]) asks minions above their
//! share to shed. Each result says how long new minions took to hold their
//! share.
//!
//! Baselines beside gru's policy: [`StaticPeak`], [`TargetTracking`] (a model
//! of EC2 target tracking) and [`Oracle`] (knows the future). With
//! [`Model::bounds`] every scaler is held to the same fleet bounds, and a
//! result says when a scaler wanted more than the maximum.

use std::fmt;
use std::time::Duration;

use jiff::Timestamp;

use crate::policy::{MinionLoad, Observation, Overrides, Policy, PolicyState, evaluate};
use crate::rebalance::{Holder, RebalanceLimits, rebalance};
use crate::scaling::Bounds;

/// One row of a trace: from `at` on, messages arrive at this rate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TracePoint {
    pub at: Timestamp,
    pub arrivals_per_s: f64,
}

/// A validated trace: at least two points, strictly increasing in time, no
/// negative or non-finite rates. The rate is piecewise constant; the last
/// point marks the end.
#[derive(Clone, Debug)]
pub struct Trace {
    points: Vec<TracePoint>,
}

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum TraceError {
    #[error("a trace needs at least two rows, got {0}")]
    TooShort(usize),
    #[error("row {row}: timestamp {at} is not after the previous row's")]
    NotIncreasing { row: usize, at: Timestamp },
    #[error("row {row}: arrivals_per_s must be a number ≥ 0, got {value}")]
    BadRate { row: usize, value: f64 },
}

impl Trace {
    pub fn new(points: Vec<TracePoint>) -> Result<Self, TraceError> {
        if points.len() < 2 {
            return Err(TraceError::TooShort(points.len()));
        }
        for (i, p) in points.iter().enumerate() {
            if !p.arrivals_per_s.is_finite() || p.arrivals_per_s < 0.0 {
                return Err(TraceError::BadRate {
                    row: i + 1,
                    value: p.arrivals_per_s,
                });
            }
            if i > 0 && p.at <= points[i - 1].at {
                return Err(TraceError::NotIncreasing {
                    row: i + 1,
                    at: p.at,
                });
            }
        }
        Ok(Trace { points })
    }

    pub fn start(&self) -> Timestamp {
        self.points[0].at
    }

    pub fn end(&self) -> Timestamp {
        self.points[self.points.len() - 1].at
    }

    pub fn points(&self) -> &[TracePoint] {
        &self.points
    }

    pub fn peak(&self) -> f64 {
        self.points
            .iter()
            .map(|p| p.arrivals_per_s)
            .fold(0.0, f64::max)
    }

    /// The rate in force at `t` (0 outside the trace).
    pub fn rate_at(&self, t: Timestamp) -> f64 {
        if t < self.start() || t >= self.end() {
            return 0.0;
        }
        let i = self.points.partition_point(|p| p.at <= t);
        self.points[i - 1].arrivals_per_s
    }

    /// The highest rate in force anywhere in `[from, to]`.
    pub fn max_rate_between(&self, from: Timestamp, to: Timestamp) -> f64 {
        let first = self.points.partition_point(|p| p.at <= from);
        self.points[first..]
            .iter()
            .take_while(|p| p.at <= to && p.at < self.end())
            .fold(self.rate_at(from), |best, p| best.max(p.arrivals_per_s))
    }
}

/// The fleet model's parameters.
#[derive(Clone, Copy, Debug)]
pub struct Model {
    /// Messages per second one minion serves.
    pub service_rate: f64,
    /// Messages one minion works on at once (its downstream connections);
    /// in-flight work is its utilization times this.
    pub slots_per_minion: u32,
    /// Launch to in service.
    pub boot_time: Duration,
    /// Chosen for removal to terminated (billed, serves nothing new).
    pub drain_time: Duration,
    /// How old the load a scaler sees may be.
    pub report_interval: Duration,
    /// How often the scaler decides.
    pub eval_interval: Duration,
    /// A second in which queued work would wait longer than this counts
    /// toward SLO-breach minutes.
    pub slo_wait: Duration,
    /// Long-lived sender connections across the fleet; `None`: none (work
    /// is spread over in-service minions as it arrives, so a minion serves
    /// as soon as it is in service).
    pub connections: Option<u32>,
    /// Engines close a connection after this age (jittered up to twice
    /// it); ZERO = never. Only with `connections`.
    pub max_connection_age: Duration,
    /// The fleet's min and max, applied to every scaler alike (an ASG
    /// would not launch past its max for any of them); `None`: unbounded.
    pub bounds: Option<Bounds>,
}

impl Default for Model {
    fn default() -> Self {
        Model {
            service_rate: 100.0,
            slots_per_minion: 4,
            boot_time: Duration::from_secs(120),
            drain_time: Duration::from_secs(30),
            report_interval: Duration::from_secs(1),
            eval_interval: Duration::from_secs(10),
            slo_wait: Duration::from_secs(30),
            connections: None,
            max_connection_age: Duration::from_secs(300),
            bounds: None,
        }
    }
}

/// What a scaler sees at an evaluation, as minions would have reported it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct View {
    pub now: Timestamp,
    /// Booting plus in service: what counts as capacity.
    pub capacity: u32,
    pub in_service: u32,
    /// Messages waiting, fleet-wide.
    pub queued: f64,
    /// Messages being worked on, fleet-wide.
    pub in_flight: f64,
    /// Messages served per second over the last report interval.
    pub served_per_s: f64,
    /// Messages arrived per second over the last report interval.
    pub arrivals_per_s: f64,
}

/// Anything that sizes the simulated fleet.
pub trait Scaler {
    fn name(&self) -> String;
    /// The desired capacity at this evaluation. `trace` is there for the
    /// oracle only; a real scaler must not look at it.
    fn desired(&mut self, view: &View, trace: &Trace, model: &Model) -> u32;
    /// How it spreads long-lived connections onto new minions; `None`: it
    /// does not (as EC2 Auto Scaling, KEDA and Nomad Autoscaler do not).
    fn rebalance(&self) -> Option<RebalanceLimits> {
        None
    }
    /// What it wants said about its run, one line each.
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }
}

/// One sample of the timeline, every [`TIMELINE_STEP`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TimelineRow {
    pub at: Timestamp,
    pub arrivals_per_s: f64,
    pub desired: u32,
    pub capacity: u32,
    pub in_service: u32,
    pub queued: f64,
}

pub const TIMELINE_STEP: Duration = Duration::from_secs(60);
const STEP: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct SimResult {
    pub scaler: String,
    pub instance_hours: f64,
    pub slo_breach_minutes: f64,
    /// Evaluations that launched or drained minions.
    pub scale_actions: u32,
    /// When each of them was.
    pub actions_at: Vec<Timestamp>,
    pub max_queue: f64,
    /// Messages still queued when the trace ended.
    pub final_queue: f64,
    /// With [`Model::connections`]: for each minion that went in service
    /// during the run and came to hold its share of the connections (the
    /// total over the in-service minions, rounded down), how long that took.
    pub times_to_share: Vec<Duration>,
    /// Minions that left service before they held their share.
    pub never_shared: u32,
    /// With [`Model::bounds`]: when the scaler wanted more than the max.
    pub above_max: Option<AboveMax>,
    pub timeline: Vec<TimelineRow>,
    /// What the scaler said about its run ([`Scaler::notes`]).
    pub notes: Vec<String>,
}

/// A scaler held at the fleet's max.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AboveMax {
    /// The most minions it asked for.
    pub most_wanted: u32,
    /// Evaluations at which it asked for more than the max.
    pub evaluations: u32,
}

impl SimResult {
    /// The median and the longest time to share, when any was measured.
    pub fn time_to_share(&self) -> Option<(Duration, Duration)> {
        let mut t = self.times_to_share.clone();
        t.sort();
        Some((*t.get((t.len().saturating_sub(1)) / 2)?, *t.last()?))
    }
}

/// One in-service minion's connections (with [`Model::connections`]).
#[derive(Clone, Copy, Debug)]
struct Holding {
    connections: u32,
    since: Timestamp,
    /// It was in service when the run began, or has held its share.
    shared: bool,
    shed_at: Option<Timestamp>,
}

/// The fleet's connections and where they are.
struct Connections {
    holdings: Vec<Holding>,
    /// Reconnects owed to max connection age, carried over between steps.
    aging: f64,
    times_to_share: Vec<Duration>,
    never_shared: u32,
    /// Senders waiting for a minion while none is in service.
    parked: u32,
}

impl Connections {
    fn new(total: u32, in_service: u32, t: Timestamp) -> Self {
        let n = in_service.max(1);
        let holdings = (0..in_service)
            .map(|i| Holding {
                connections: total / n + u32::from(i < total % n),
                since: t,
                shared: true,
                shed_at: None,
            })
            .collect();
        Connections {
            holdings,
            aging: 0.0,
            times_to_share: Vec::new(),
            never_shared: 0,
            parked: if in_service == 0 { total } else { 0 },
        }
    }

    fn total(&self) -> u32 {
        self.holdings.iter().map(|h| h.connections).sum()
    }

    /// The load balancer's pick for a reconnect: least connections.
    fn place(&mut self, n: u32) {
        for _ in 0..n {
            if let Some(h) = self.holdings.iter_mut().min_by_key(|h| h.connections) {
                h.connections += 1;
            }
        }
    }

    fn join(&mut self, t: Timestamp) {
        self.holdings.push(Holding {
            connections: 0,
            since: t,
            shared: false,
            shed_at: None,
        });
        let parked = std::mem::take(&mut self.parked);
        self.place(parked);
    }

    /// Takes `n` minions out of service, those with the fewest connections
    /// first; their senders reconnect onto the others.
    fn leave(&mut self, n: u32) {
        let mut moving = 0;
        for _ in 0..n {
            let Some(i) = (0..self.holdings.len()).min_by_key(|&i| self.holdings[i].connections)
            else {
                break;
            };
            let h = self.holdings.swap_remove(i);
            moving += h.connections;
            self.never_shared += u32::from(!h.shared);
        }
        if self.holdings.is_empty() {
            // No one to reconnect to: the senders wait for the next minion.
            self.aging = 0.0;
            self.parked += moving;
        } else {
            self.place(moving);
        }
    }

    /// One step of `dt`: connections that reached their age reconnect
    /// (taken from the minion holding the most: on average it has the most
    /// aging out).
    fn age(&mut self, model: &Model, dt: f64) {
        if self.holdings.len() < 2 || model.max_connection_age.is_zero() {
            return;
        }
        self.aging += f64::from(self.total()) * dt / (1.5 * model.max_connection_age.as_secs_f64());
        while self.aging >= 1.0 {
            self.aging -= 1.0;
            if let Some(h) = self.holdings.iter_mut().max_by_key(|h| h.connections)
                && h.connections > 0
            {
                h.connections -= 1;
                self.place(1);
            }
        }
    }

    /// gru's rebalancing, as the controller's planner decides it.
    fn rebalance(&mut self, limits: &RebalanceLimits, t: Timestamp) {
        let ids: Vec<String> = (0..self.holdings.len()).map(|i| i.to_string()).collect();
        let holders: Vec<Holder> = self
            .holdings
            .iter()
            .zip(&ids)
            .map(|(h, id)| Holder {
                id,
                connections: u64::from(h.connections),
                can_shed: true,
                since_shed: h.shed_at.map(|at| t.duration_since(at).unsigned_abs()),
            })
            .collect();
        let sheds = rebalance(&holders, limits);
        for shed in sheds {
            let Ok(i) = shed.id.parse::<usize>() else {
                continue;
            };
            let count = u32::try_from(shed.count).unwrap_or(u32::MAX);
            let h = &mut self.holdings[i];
            h.connections -= count.min(h.connections);
            h.shed_at = Some(t);
            self.place(count);
        }
    }

    /// Records the minions that came to hold their share at `t`.
    fn note_shares(&mut self, t: Timestamp) {
        let n = self.holdings.len() as u32;
        if n == 0 {
            return;
        }
        let share = self.total() / n;
        for h in &mut self.holdings {
            if !h.shared && h.connections >= share {
                h.shared = true;
                self.times_to_share
                    .push(t.duration_since(h.since).unsigned_abs());
            }
        }
    }

    /// What the in-service minions serve in `dt`: each up to `service_rate`
    /// through the connections it holds.
    fn capacity(&self, model: &Model, dt: f64) -> f64 {
        let slots = f64::from(model.slots_per_minion.max(1));
        self.holdings
            .iter()
            .map(|h| (f64::from(h.connections) / slots).min(1.0))
            .sum::<f64>()
            * model.service_rate
            * dt
    }
}

impl fmt::Display for SimResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<18} {:>10.1} instance-h {:>8.1} SLO-breach min {:>6} actions  max queue {:.0}",
            self.scaler,
            self.instance_hours,
            self.slo_breach_minutes,
            self.scale_actions,
            self.max_queue
        )
    }
}

fn after(t: Timestamp, d: Duration) -> Timestamp {
    // Adding a std Duration cannot fail for a unit reason; saturate at the end of time.
    t.saturating_add(d).unwrap_or(Timestamp::MAX)
}

/// Runs `scaler` over `trace` with `model`, starting with `initial` minions
/// in service.
pub fn run(trace: &Trace, model: &Model, scaler: &mut dyn Scaler, initial: u32) -> SimResult {
    let bounds = model.bounds.unwrap_or(Bounds {
        min: 0,
        max: u32::MAX,
    });
    let mut above_max: Option<AboveMax> = None;
    let initial = bounds.clamp(initial);
    let dt = STEP.as_secs_f64();
    let mu = model.service_rate.max(f64::MIN_POSITIVE);
    let mut booting: Vec<Timestamp> = Vec::new();
    let mut in_service = initial;
    let mut draining: Vec<Timestamp> = Vec::new();
    let mut queue = 0.0f64;
    let (mut instance_seconds, mut breach_seconds, mut max_queue) = (0.0, 0.0, 0.0f64);
    let mut actions_at = Vec::new();
    let mut desired = initial;
    let mut timeline = Vec::new();
    let mut held = model
        .connections
        .map(|c| Connections::new(c, initial, trace.start()));
    let rebalancing = scaler.rebalance();
    // The last report: what the scaler sees.
    let mut report = (0.0f64, 0.0f64, 0.0f64, 0.0f64); // queued, in_flight, served/s, arrivals/s
    let (mut served_acc, mut arrived_acc, mut acc_secs) = (0.0, 0.0, 0.0);
    let mut next_report = trace.start();
    let mut next_eval = trace.start();
    let mut next_sample = trace.start();
    let mut t = trace.start();
    while t < trace.end() {
        booting.retain(|&ready| {
            if ready <= t {
                in_service += 1;
                if let Some(h) = held.as_mut() {
                    h.join(t);
                }
                false
            } else {
                true
            }
        });
        draining.retain(|&done| done > t);

        let arrivals = trace.rate_at(t) * dt;
        let capacity_now = match &held {
            Some(h) => h.capacity(model, dt),
            None => f64::from(in_service) * mu * dt,
        };
        let available = queue + arrivals;
        let served = available.min(capacity_now);
        queue = available - served;
        max_queue = max_queue.max(queue);
        let wait = if queue <= 0.0 {
            0.0
        } else if capacity_now <= 0.0 {
            f64::INFINITY
        } else {
            queue / (capacity_now / dt)
        };
        if let Some(h) = held.as_mut() {
            h.age(model, dt);
        }
        if wait > model.slo_wait.as_secs_f64() {
            breach_seconds += dt;
        }
        let billed = booting.len() + in_service as usize + draining.len();
        instance_seconds += billed as f64 * dt;
        served_acc += served;
        arrived_acc += arrivals;
        acc_secs += dt;

        if t >= next_report {
            let busy = if in_service == 0 {
                0.0
            } else {
                served_acc / acc_secs / mu
            };
            report = (
                queue,
                busy * f64::from(model.slots_per_minion),
                served_acc / acc_secs,
                arrived_acc / acc_secs,
            );
            (served_acc, arrived_acc, acc_secs) = (0.0, 0.0, 0.0);
            next_report = after(next_report, model.report_interval);
            // The controller's pass on these reports; never while a minion
            // drains (the drain moves connections itself).
            if let (Some(h), Some(limits)) = (held.as_mut(), &rebalancing)
                && draining.is_empty()
            {
                h.rebalance(limits, t);
            }
            if let Some(h) = held.as_mut() {
                h.note_shares(t);
            }
        }

        if t >= next_eval {
            let capacity = booting.len() as u32 + in_service;
            let view = View {
                now: t,
                capacity,
                in_service,
                queued: report.0,
                in_flight: report.1,
                served_per_s: report.2,
                arrivals_per_s: report.3,
            };
            let wanted = scaler.desired(&view, trace, model);
            if wanted > bounds.max {
                let a = above_max.get_or_insert(AboveMax {
                    most_wanted: wanted,
                    evaluations: 0,
                });
                a.most_wanted = a.most_wanted.max(wanted);
                a.evaluations += 1;
            }
            desired = bounds.clamp(wanted);
            if desired > capacity {
                let ready = after(t, model.boot_time);
                booting.extend((capacity..desired).map(|_| ready));
                actions_at.push(t);
            } else if desired < capacity {
                let mut remove = capacity - desired;
                // Cancel launches first: they hold no work.
                while remove > 0 && booting.pop().is_some() {
                    remove -= 1;
                }
                let done = after(t, model.drain_time);
                let drained = remove.min(in_service);
                in_service -= drained;
                if let Some(h) = held.as_mut() {
                    h.leave(drained);
                }
                draining.extend((0..drained).map(|_| done));
                actions_at.push(t);
            }
            next_eval = after(next_eval, model.eval_interval);
        }

        if t >= next_sample {
            timeline.push(TimelineRow {
                at: t,
                arrivals_per_s: trace.rate_at(t),
                desired,
                capacity: booting.len() as u32 + in_service,
                in_service,
                queued: queue,
            });
            next_sample = after(next_sample, TIMELINE_STEP);
        }
        t = after(t, STEP);
    }
    SimResult {
        notes: scaler.notes(),
        scaler: scaler.name(),
        instance_hours: instance_seconds / 3600.0,
        slo_breach_minutes: breach_seconds / 60.0,
        scale_actions: u32::try_from(actions_at.len()).unwrap_or(u32::MAX),
        actions_at,
        max_queue,
        final_queue: queue,
        times_to_share: held
            .as_ref()
            .map(|h| h.times_to_share.clone())
            .unwrap_or_default(),
        never_shared: held.as_ref().map_or(0, |h| h.never_shared),
        above_max,
        timeline,
    }
}

/// gru's own policy, evaluated exactly as the controller evaluates it; the
/// fleet's load is spread evenly over the in-service minions, as the load
/// balancer would.
pub struct GruPolicy {
    policy: Policy,
    state: PolicyState,
    rebalance: Option<RebalanceLimits>,
    /// Decisions made, the forecast's wins that raised the size, and the
    /// break-even hold's clips.
    decisions: u64,
    forecast_raised: u64,
    held: u64,
}

impl GruPolicy {
    /// gru without connection rebalancing.
    pub fn new(policy: Policy) -> Self {
        GruPolicy {
            policy,
            state: PolicyState::new(),
            rebalance: None,
            decisions: 0,
            forecast_raised: 0,
            held: 0,
        }
    }

    /// With the fleet's `[fleet.rebalance]` settings (`None`: off).
    pub fn with_rebalance(mut self, rebalance: Option<RebalanceLimits>) -> Self {
        self.rebalance = rebalance;
        self
    }
}

impl Scaler for GruPolicy {
    fn name(&self) -> String {
        "gru".to_owned()
    }

    fn desired(&mut self, view: &View, _: &Trace, _: &Model) -> u32 {
        let n = view.in_service;
        let queued = spread(view.queued, n);
        let in_flight = spread(view.in_flight, n);
        let rate = (n > 0).then(|| view.served_per_s / f64::from(n));
        let minions = (0..n as usize)
            .map(|i| MinionLoad {
                queued: queued[i],
                in_flight: in_flight[i],
                rate_per_s: rate,
            })
            .collect();
        let obs = Observation {
            capacity: view.capacity,
            minions,
            external: Vec::new(),
        };
        let d = evaluate(
            &self.policy,
            &mut self.state,
            &obs,
            &Overrides::default(),
            view.now,
        );
        self.decisions += 1;
        if d.desired > view.capacity && d.explanation.source_name() == "forecast" {
            self.forecast_raised += 1;
        }
        if d.explanation
            .clips
            .iter()
            .any(|c| c.kind == crate::policy::ClipKind::BreakEvenHold)
        {
            self.held += 1;
        }
        d.desired
    }

    fn rebalance(&self) -> Option<RebalanceLimits> {
        self.rebalance
    }

    fn notes(&self) -> Vec<String> {
        vec![
            format!(
                "forecast ({}) launched ahead at {} of {} decisions",
                self.policy.behaviour().forecast.as_str(),
                self.forecast_raised,
                self.decisions
            ),
            format!(
                "break-even hold kept idle minions at {} decisions",
                self.held
            ),
        ]
    }
}

/// Splits a fleet-wide amount over `n` minions as whole messages that add up
/// to the rounded total (as the load balancer would spread it), so no
/// rounding inflates the load the policy sees.
fn spread(total: f64, n: u32) -> Vec<u64> {
    if n == 0 {
        return Vec::new();
    }
    let total = total.max(0.0).round() as u64;
    let (each, rest) = (total / u64::from(n), total % u64::from(n));
    (0..u64::from(n))
        .map(|i| each + u64::from(i < rest))
        .collect()
}

fn minions_for(rate: f64, model: &Model) -> u32 {
    (rate / model.service_rate.max(f64::MIN_POSITIVE))
        .ceil()
        .max(0.0) as u32
}

/// Static provisioning for the trace's peak, all the time.
pub struct StaticPeak {
    pub minions: u32,
}

impl StaticPeak {
    /// The minions the trace's peak needs (a run within [`Model::bounds`]
    /// holds it at the max, and its [`SimResult::above_max`] says so).
    pub fn for_trace(trace: &Trace, model: &Model) -> Self {
        StaticPeak {
            minions: minions_for(trace.peak(), model).max(1),
        }
    }
}

impl Scaler for StaticPeak {
    fn name(&self) -> String {
        format!("static peak ({})", self.minions)
    }

    fn desired(&mut self, _: &View, _: &Trace, _: &Model) -> u32 {
        self.minions
    }
}

/// Knows the future: keeps exactly the minions the next boot time and
/// evaluation interval will need, launching them boot-time ahead; with
/// long-lived connections it also spreads them as gru's rebalancing does.
pub struct Oracle;

impl Scaler for Oracle {
    fn name(&self) -> String {
        "oracle".to_owned()
    }

    fn desired(&mut self, view: &View, trace: &Trace, model: &Model) -> u32 {
        let horizon = after(view.now, model.boot_time + model.eval_interval);
        let need = minions_for(trace.max_rate_between(view.now, horizon), model);
        // Work already queued is cleared within the SLO too.
        let backlog = (view.queued / (model.service_rate * model.slo_wait.as_secs_f64().max(1.0)))
            .ceil() as u32;
        need.saturating_add(backlog).max(1)
    }

    fn rebalance(&self) -> Option<RebalanceLimits> {
        Some(crate::rebalance::DEFAULT_REBALANCE)
    }
}

/// A model of EC2 target tracking on utilization: one-minute datapoints;
/// scale out after 3 datapoints above target, scale in after 15 below
/// (at 90 % of target), to `ceil(capacity × metric / target)`; 300 s
/// cooldown after a scale-out before another scale-in or scale-out.
pub struct TargetTracking {
    pub target_utilization: f64,
    minute_start: Option<Timestamp>,
    minute_sum: f64,
    minute_n: f64,
    datapoints: Vec<f64>,
    last_scale: Option<Timestamp>,
    desired: Option<u32>,
}

impl TargetTracking {
    pub const DATAPOINT: Duration = Duration::from_secs(60);
    pub const OUT_DATAPOINTS: usize = 3;
    pub const IN_DATAPOINTS: usize = 15;
    pub const COOLDOWN: Duration = Duration::from_secs(300);

    pub fn new(target_utilization: f64) -> Self {
        TargetTracking {
            target_utilization,
            minute_start: None,
            minute_sum: 0.0,
            minute_n: 0.0,
            datapoints: Vec::new(),
            last_scale: None,
            desired: None,
        }
    }
}

impl Scaler for TargetTracking {
    fn name(&self) -> String {
        format!("target tracking {:.0}%", self.target_utilization * 100.0)
    }

    fn desired(&mut self, view: &View, _: &Trace, model: &Model) -> u32 {
        let current = *self.desired.get_or_insert(view.capacity.max(1));
        // Utilization as CloudWatch would see it: demand over in-service capacity.
        let serving = f64::from(view.in_service.max(1)) * model.service_rate;
        let demand = view.arrivals_per_s + view.queued / Self::DATAPOINT.as_secs_f64();
        self.minute_sum += demand / serving;
        self.minute_n += 1.0;
        let start = *self.minute_start.get_or_insert(view.now);
        if view.now < after(start, Self::DATAPOINT) {
            return current;
        }
        self.datapoints.push(self.minute_sum / self.minute_n);
        (self.minute_sum, self.minute_n, self.minute_start) = (0.0, 0.0, Some(view.now));
        let cooling = self
            .last_scale
            .is_some_and(|at| view.now < after(at, Self::COOLDOWN));
        let recent = |n: usize| {
            self.datapoints
                .iter()
                .rev()
                .take(n)
                .copied()
                .collect::<Vec<f64>>()
        };
        let target = self.target_utilization;
        let out = recent(Self::OUT_DATAPOINTS);
        let inn = recent(Self::IN_DATAPOINTS);
        let metric = *self.datapoints.last().unwrap_or(&0.0);
        let proposed = ((f64::from(current) * metric / target).ceil() as u32).max(1);
        if out.len() == Self::OUT_DATAPOINTS
            && out.iter().all(|&m| m > target)
            && !cooling
            && proposed > current
        {
            self.desired = Some(proposed);
            self.last_scale = Some(view.now);
        } else if inn.len() == Self::IN_DATAPOINTS
            && inn.iter().all(|&m| m < target * 0.9)
            && !cooling
            && proposed < current
        {
            self.desired = Some(proposed);
            self.last_scale = Some(view.now);
            self.datapoints.clear();
        }
        self.desired.unwrap_or(current)
    }
}

/// A small seeded generator (SplitMix64): the same seed gives the same trace
/// on every machine, with no dependency.
struct SplitMix(u64);

impl SplitMix {
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Which synthetic trace to make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceKind {
    /// A week from Monday 00:00 UTC, one row a minute: a diurnal weekday
    /// curve (night floor, morning ramp, midday peak, evening decline), a
    /// weekend at about a third of weekdays, a few short bursts, ±5 % noise.
    Week,
    /// Six hours, one row a minute: steady load with a sharp spike to six
    /// times it for 20 minutes in the middle.
    Spike,
    /// Twelve hours, one row a minute, of what batch senders do: a trickle
    /// at a tenth of `peak` (a laboratory's live feed), and every 4 to 12
    /// minutes (the seed chooses) one minute at `peak` (a system that
    /// drops a file of results at a time: with `peak` 1,000 that is 60,000
    /// messages at once); from hour 6 the upstream interface is down for
    /// half an hour (nothing arrives) and then flushes what it held at
    /// half of `peak` until it has caught up. A reactive policy that reads
    /// each dump as demand launches for every one of them, and the minions
    /// arrive after the dump is gone.
    Batch,
    /// Two weeks from Monday 00:00 UTC, one row a minute, of a fleet fed
    /// by people's working hours (clinics, order entry, a plant's shifts):
    /// a night floor at a twentieth of `peak`; on weekdays the day starts
    /// at 07:00 with a climb to `peak` within three minutes (faster than a
    /// boot), dips to 60 % over lunch (12:00–13:00), and ends at 17:00
    /// with a fall to a fifth within ten minutes, back at the floor from
    /// 19:00; Saturday mornings (08:00–12:00) run at 40 %; Sundays stay at
    /// the floor; the second Thursday is a public holiday (the floor all
    /// day); ±5 % noise. The rises are the same every day: a policy that
    /// only reacts meets each with a queue, one that remembers can launch
    /// ahead of it.
    Shifts,
}

/// Generates a trace. `peak` is the weekday midday rate in messages/s.
pub fn generate(kind: TraceKind, seed: u64, peak: f64, start: Timestamp) -> Trace {
    let mut rng = SplitMix(seed);
    let minutes = match kind {
        TraceKind::Week => 7 * 24 * 60,
        TraceKind::Spike => 6 * 60,
        TraceKind::Batch => 12 * 60,
        TraceKind::Shifts => 14 * 24 * 60,
    };
    // Burst starts (minute of the week) and lengths, chosen by the seed.
    let bursts: Vec<(u32, u32)> = (0..4)
        .map(|_| {
            (
                (rng.next_f64() * f64::from(minutes)) as u32,
                5 + (rng.next_f64() * 25.0) as u32,
            )
        })
        .collect();
    // Batch dumps: minutes at which a file arrives, 4 to 12 minutes apart.
    let mut dumps = Vec::new();
    let mut next = 4 + (rng.next_f64() * 8.0) as u32;
    while next < minutes {
        dumps.push(next);
        next += 4 + (rng.next_f64() * 8.0) as u32;
    }
    // The outage (minutes 360..390) holds back the trickle and the dumps
    // due in it; the flush sends them at half the peak afterwards.
    let (outage_start, outage_end) = (360u32, 390u32);
    let held_back = {
        let dumped = dumps
            .iter()
            .filter(|&&d| (outage_start..outage_end).contains(&d))
            .count() as f64;
        (f64::from(outage_end - outage_start) * 0.1 + dumped) * peak * 60.0
    };
    let flush_minutes = (held_back / (peak * 0.5 * 60.0)).ceil() as u32;
    let mut points = Vec::with_capacity(minutes as usize + 1);
    for m in 0..=minutes {
        let at = after(start, Duration::from_secs(u64::from(m) * 60));
        let base = match kind {
            TraceKind::Week => {
                let day = m / (24 * 60);
                let hour = f64::from(m % (24 * 60)) / 60.0;
                // 0 at 03:00, 1 at 13:00: a smooth daily curve.
                let daily =
                    (0.5 - 0.5 * ((hour - 3.0) / 24.0 * std::f64::consts::TAU).cos()).powf(1.5);
                let weekday = day < 5;
                let level = if weekday {
                    0.08 + 0.92 * daily
                } else {
                    0.05 + 0.28 * daily
                };
                let burst = bursts.iter().any(|&(s, len)| m >= s && m < s + len);
                peak * level * if burst { 1.8 } else { 1.0 }
            }
            TraceKind::Spike => {
                let steady = peak / 6.0;
                if (170..190).contains(&m) {
                    peak
                } else {
                    steady
                }
            }
            TraceKind::Shifts => {
                let day = m / (24 * 60);
                let minute = f64::from(m % (24 * 60));
                let floor = 0.05;
                // Linear from `a` at minute `from` to `b` over `len` minutes.
                let ramp = |from: f64, len: f64, a: f64, b: f64| {
                    a + (b - a) * ((minute - from) / len).clamp(0.0, 1.0)
                };
                let level = match day % 7 {
                    _ if day == 10 => floor,
                    0..=4 => match minute as u32 {
                        0..420 => floor,
                        420..720 => ramp(420.0, 3.0, floor, 1.0),
                        720..780 => 0.6,
                        780..1020 => 1.0,
                        1020..1140 => ramp(1020.0, 10.0, 1.0, 0.2),
                        _ => floor,
                    },
                    5 if (480..720).contains(&(minute as u32)) => ramp(480.0, 3.0, floor, 0.4),
                    _ => floor,
                };
                peak * level
            }
            TraceKind::Batch => {
                if (outage_start..outage_end).contains(&m) {
                    0.0
                } else if (outage_end..outage_end + flush_minutes).contains(&m) {
                    peak * 0.5 + peak * 0.1
                } else if dumps.contains(&m) {
                    peak
                } else {
                    peak * 0.1
                }
            }
        };
        let noise = 1.0 + (rng.next_f64() - 0.5) * 0.1;
        points.push(TracePoint {
            at,
            arrivals_per_s: (base * noise).max(0.0),
        });
    }
    // Strictly increasing, non-negative by construction.
    Trace { points }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::SignedDuration;

    fn ts(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    fn flat(rate: f64, minutes: i64) -> Trace {
        let start = ts("2026-11-23T00:00:00Z");
        Trace::new(vec![
            TracePoint {
                at: start,
                arrivals_per_s: rate,
            },
            TracePoint {
                at: start + SignedDuration::from_mins(minutes),
                arrivals_per_s: 0.0,
            },
        ])
        .expect("trace")
    }

    /// A fixed size, with or without gru's rebalancing.
    struct Fixed {
        minions: u32,
        rebalance: Option<RebalanceLimits>,
    }

    impl Scaler for Fixed {
        fn name(&self) -> String {
            format!("fixed {}", self.minions)
        }
        fn desired(&mut self, _: &View, _: &Trace, _: &Model) -> u32 {
            self.minions
        }
        fn rebalance(&self) -> Option<RebalanceLimits> {
            self.rebalance
        }
    }

    #[test]
    fn new_minions_serve_only_through_the_connections_that_reach_them() {
        // 16 senders on one minion; three more boot within the first
        // minute. 300 msg/s needs three minions' worth of connections.
        let trace = flat(300.0, 20);
        let model = |age: u64| Model {
            connections: Some(16),
            max_connection_age: Duration::from_secs(age),
            ..Model::default()
        };
        let fixed = |rebalance| Fixed {
            minions: 4,
            rebalance,
        };
        let never = run(&trace, &model(0), &mut fixed(None), 1);
        assert!(
            never.times_to_share.is_empty(),
            "{:?}",
            never.times_to_share
        );
        assert!(
            never.final_queue > 100.0 * 60.0,
            "one minion's rate all along: {}",
            never.final_queue
        );
        let aged = run(&trace, &model(120), &mut fixed(None), 1);
        let spread = run(
            &trace,
            &model(120),
            &mut fixed(Some(crate::rebalance::DEFAULT_REBALANCE)),
            1,
        );
        let (aged_p50, aged_max) = aged.time_to_share().expect("shared by age");
        let (p50, max) = spread.time_to_share().expect("shared by rebalancing");
        assert_eq!(spread.times_to_share.len(), 3);
        assert!(
            max <= model(0).report_interval * 2,
            "{:?}",
            spread.times_to_share
        );
        assert!(
            aged_p50 >= Duration::from_secs(10) && aged_max > max && aged_p50 > p50,
            "{:?} vs {:?}",
            aged.times_to_share,
            spread.times_to_share
        );
        assert!(spread.slo_breach_minutes < aged.slo_breach_minutes);
        assert!(aged.slo_breach_minutes < never.slo_breach_minutes);
        // Without connections (the default model) a booted minion serves at
        // once and nothing is measured.
        let plain = run(&trace, &Model::default(), &mut fixed(None), 1);
        assert!(plain.times_to_share.is_empty());
        assert!(plain.slo_breach_minutes <= spread.slo_breach_minutes);
    }

    #[test]
    fn traces_are_validated_with_the_row() {
        let t = ts("2026-11-23T00:00:00Z");
        assert_eq!(Trace::new(vec![]).unwrap_err(), TraceError::TooShort(0));
        let e = Trace::new(vec![
            TracePoint {
                at: t,
                arrivals_per_s: 1.0,
            },
            TracePoint {
                at: t,
                arrivals_per_s: 1.0,
            },
        ])
        .unwrap_err();
        assert_eq!(e, TraceError::NotIncreasing { row: 2, at: t });
        let e = Trace::new(vec![
            TracePoint {
                at: t,
                arrivals_per_s: -1.0,
            },
            TracePoint {
                at: t + SignedDuration::from_secs(1),
                arrivals_per_s: 1.0,
            },
        ])
        .unwrap_err();
        assert_eq!(
            e,
            TraceError::BadRate {
                row: 1,
                value: -1.0
            }
        );
    }

    #[test]
    fn static_capacity_bills_every_hour_and_never_breaches_when_enough() {
        let trace = flat(250.0, 60);
        let model = Model::default();
        let mut s = StaticPeak::for_trace(&trace, &model);
        assert_eq!(s.minions, 3);
        let r = run(&trace, &model, &mut s, 3);
        assert!(
            (r.instance_hours - 3.0).abs() < 0.01,
            "{}",
            r.instance_hours
        );
        assert_eq!(r.slo_breach_minutes, 0.0);
        assert_eq!(r.max_queue, 0.0);
        assert_eq!(r.timeline.len(), 60);
    }

    #[test]
    fn too_little_capacity_queues_and_breaches() {
        let trace = flat(250.0, 60);
        let model = Model::default();
        let r = run(&trace, &model, &mut StaticPeak { minions: 2 }, 2);
        // 50 msg/s excess for an hour.
        assert!(
            (r.max_queue - 50.0 * 3600.0).abs() < 100.0,
            "{}",
            r.max_queue
        );
        assert!(r.slo_breach_minutes > 50.0, "{}", r.slo_breach_minutes);
    }

    #[test]
    fn the_oracle_launches_ahead_and_scales_in_after() {
        let start = ts("2026-11-23T00:00:00Z");
        let at = |m: i64| start + SignedDuration::from_mins(m);
        let trace = Trace::new(vec![
            TracePoint {
                at: at(0),
                arrivals_per_s: 50.0,
            },
            TracePoint {
                at: at(30),
                arrivals_per_s: 450.0,
            },
            TracePoint {
                at: at(60),
                arrivals_per_s: 50.0,
            },
            TracePoint {
                at: at(90),
                arrivals_per_s: 0.0,
            },
        ])
        .expect("trace");
        let model = Model::default();
        let r = run(&trace, &model, &mut Oracle, 1);
        assert_eq!(r.slo_breach_minutes, 0.0, "the oracle never breaches");
        let peak_in_service = r
            .timeline
            .iter()
            .map(|row| row.in_service)
            .max()
            .unwrap_or(0);
        assert_eq!(peak_in_service, 5);
        assert_eq!(
            r.timeline.last().map(|row| row.in_service),
            Some(1),
            "scaled back in"
        );
        let static_peak = run(
            &trace,
            &model,
            &mut StaticPeak::for_trace(&trace, &model),
            5,
        );
        assert!(r.instance_hours < static_peak.instance_hours * 0.7);
    }

    #[test]
    fn every_scaler_is_held_to_the_fleet_bounds_and_says_so() {
        // 800 msg/s needs 8 minions at 100 msg/s; the fleet's max is 5.
        let trace = flat(800.0, 30);
        let model = Model {
            bounds: Some(Bounds { min: 2, max: 5 }),
            ..Model::default()
        };
        let mut peak = StaticPeak::for_trace(&trace, &model);
        assert_eq!(peak.minions, 8);
        let r = run(&trace, &model, &mut peak, 8);
        let most = r.timeline.iter().map(|row| row.capacity).max();
        assert_eq!(most, Some(5), "never above the max");
        assert_eq!(
            r.above_max.map(|a| a.most_wanted),
            Some(8),
            "it wanted 8: {:?}",
            r.above_max
        );
        for mut scaler in [
            Box::new(Oracle) as Box<dyn Scaler>,
            Box::new(TargetTracking::new(0.7)),
        ] {
            let r = run(&trace, &model, scaler.as_mut(), 1);
            assert!(
                r.timeline.iter().all(|row| (2..=5).contains(&row.capacity)),
                "{} left the bounds",
                r.scaler
            );
            assert!(r.above_max.is_some(), "{} wanted more than 5", r.scaler);
        }
        // Within the bounds nothing is said.
        let r = run(&flat(300.0, 30), &model, &mut Oracle, 3);
        assert_eq!(r.above_max, None);
        let unbounded = run(&trace, &Model::default(), &mut Oracle, 1);
        assert_eq!(unbounded.above_max, None);
        assert!(unbounded.timeline.iter().any(|row| row.capacity > 5));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        /// gru's backlog rule settles on a constant load whatever its
        /// target relative to a minion's concurrency (4 here): a target
        /// above it once read a fleet that keeps up as too big and the
        /// queue after each scale-in as demand, and cycled all day.
        #[test]
        fn a_constant_load_settles_for_any_backlog_target(
            target in 1u32..=16,
            rate in 50.0f64..1500.0,
        ) {
            use crate::policy::{Behaviour, Rule};
            let policy = Policy::new(
                Bounds { min: 1, max: 40 },
                vec![Rule::QueueDepth { target_per_minion: target }],
                Behaviour::default(),
                Vec::new(),
            )
            .expect("policy");
            let trace = flat(rate, 180);
            let r = run(&trace, &Model::default(), &mut GruPolicy::new(policy), 1);
            let settled = trace.start() + SignedDuration::from_hours(1);
            let late = r.actions_at.iter().filter(|&&t| t >= settled).count();
            proptest::prop_assert!(
                late <= 10,
                "{late} actions in the last two hours at {rate:.0} msg/s, target {target}"
            );
        }

        /// The same for the rule sized on rates, for any utilization, and
        /// it settles at the minions the rate needs at that utilization.
        #[test]
        fn a_constant_load_settles_for_any_utilization(
            percent in 50u32..=100,
            rate in 50.0f64..1500.0,
        ) {
            use crate::policy::{Behaviour, Rule};
            let utilization = f64::from(percent) / 100.0;
            let policy = Policy::new(
                Bounds { min: 1, max: 40 },
                vec![Rule::Arrivals { utilization }],
                Behaviour::default(),
                Vec::new(),
            )
            .expect("policy");
            let trace = flat(rate, 180);
            let model = Model::default();
            let r = run(&trace, &model, &mut GruPolicy::new(policy), 1);
            let settled = trace.start() + SignedDuration::from_hours(1);
            let late = r.actions_at.iter().filter(|&&t| t >= settled).count();
            proptest::prop_assert!(
                late <= 10,
                "{late} actions in the last two hours at {rate:.0} msg/s, utilization {utilization}"
            );
            // Within the tolerance band (10 %) and one minion of what the
            // rate needs at that utilization.
            let need = (rate / (model.service_rate * utilization)).ceil() as u32;
            let last = r.timeline.last().expect("timeline").desired;
            let band = (f64::from(need) * Behaviour::default().tolerance).ceil() as u32 + 1;
            proptest::prop_assert!(
                last.abs_diff(need.max(1)) <= band,
                "settled at {last}, the rate needs {need} at {rate:.0} msg/s and {utilization}"
            );
        }
    }

    #[test]
    fn target_tracking_waits_three_datapoints_and_cools_down() {
        let start = ts("2026-11-23T00:00:00Z");
        let at = |m: i64| start + SignedDuration::from_mins(m);
        let trace = Trace::new(vec![
            TracePoint {
                at: at(0),
                arrivals_per_s: 80.0,
            },
            TracePoint {
                at: at(10),
                arrivals_per_s: 400.0,
            },
            TracePoint {
                at: at(120),
                arrivals_per_s: 0.0,
            },
        ])
        .expect("trace");
        let model = Model::default();
        let r = run(&trace, &model, &mut TargetTracking::new(0.7), 2);
        let first_out = r
            .timeline
            .iter()
            .find(|row| row.desired > 2)
            .map(|row| row.at);
        let first_out = first_out.expect("scales out");
        // Not before 3 one-minute datapoints after the step at minute 10.
        assert!(first_out >= at(12), "scaled out at {first_out}");
        assert!(r.slo_breach_minutes > 0.0, "reacting late costs SLO");
    }

    #[test]
    fn load_is_spread_without_inflation() {
        assert_eq!(spread(33.1, 11), vec![3; 11]);
        assert_eq!(spread(7.0, 3), vec![3, 2, 2]);
        assert!(spread(5.0, 0).is_empty());
    }

    #[test]
    fn generated_traces_are_deterministic_and_shaped() {
        let start = ts("2026-11-23T00:00:00Z");
        let a = generate(TraceKind::Week, 7, 1000.0, start);
        let b = generate(TraceKind::Week, 7, 1000.0, start);
        assert_eq!(a.points(), b.points());
        assert_eq!(a.points().len(), 7 * 24 * 60 + 1);
        let at =
            |day: i64, hour: i64| a.rate_at(start + SignedDuration::from_hours(day * 24 + hour));
        assert!(
            at(1, 13) > 4.0 * at(1, 3),
            "weekday midday well above night"
        );
        assert!(at(5, 13) < 0.5 * at(1, 13), "weekend dip");
        let spike = generate(TraceKind::Spike, 7, 600.0, start);
        assert!(spike.peak() > 5.0 * spike.rate_at(start));
        let batch = generate(TraceKind::Batch, 7, 1000.0, start);
        assert_eq!(batch.points().len(), 12 * 60 + 1);
        let dumps = batch
            .points()
            .iter()
            .filter(|p| p.arrivals_per_s > 900.0)
            .count();
        assert!((60..=180).contains(&dumps), "{dumps} dumps in 12 hours");
        let at = |minute: i64| batch.rate_at(start + SignedDuration::from_mins(minute));
        assert!(at(1) < 120.0, "a trickle between dumps");
        assert_eq!(at(370), 0.0, "the outage");
        assert!(at(391) > 500.0, "the flush after it");
        let shifts = generate(TraceKind::Shifts, 7, 1000.0, start);
        assert_eq!(shifts.points().len(), 14 * 24 * 60 + 1);
        let at = |day: i64, minute: i64| {
            shifts.rate_at(start + SignedDuration::from_mins(day * 24 * 60 + minute))
        };
        // Monday: the floor at 06:59, the peak by 07:03, the lunch dip, a
        // fifth after 17:10, the floor after 19:00.
        assert!(at(0, 419) < 60.0 && at(0, 423) > 900.0);
        assert!((550.0..650.0).contains(&at(0, 750)));
        assert!((180.0..220.0).contains(&at(0, 1035)) && at(0, 1150) < 60.0);
        // Saturday morning at 40 %, Sunday and the second Thursday at the
        // floor all day.
        assert!((380.0..420.0).contains(&at(5, 600)));
        assert!(at(6, 600) < 60.0 && at(10, 600) < 60.0);
        assert!(at(9, 600) > 900.0, "the second Wednesday is a working day");
    }
}
