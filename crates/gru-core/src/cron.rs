//! The 5-field cron subset that schedule windows open and close on:
//! `minute hour day-of-month month day-of-week`.
//!
//! Supported in each field: `*`, a value, a range `a-b`, a step `*/s`,
//! `a-b/s` or `a/s` (from `a` to the field's end), and comma lists of those.
//! Months may be named `jan`..`dec`, days `sun`..`sat` (case-insensitive);
//! day-of-week 0 and 7 are both Sunday. As in Vixie cron, when both
//! day-of-month and day-of-week are restricted (neither starts with `*`), a
//! day matches if either does; otherwise both must (so `*/2` in one field
//! still restricts it).
//!
//! Why our own parser: the maintained crates either speak chrono (`cron`,
//! with a seconds-first 6/7-field syntax) or an older jiff (`croner` 4 with
//! jiff 0.2) and pull proc-macro crates in, and neither lets us choose how a
//! local time that falls in a DST gap or fold becomes an instant, which the
//! schedules must decide themselves (see `schedule.rs`). Matching civil
//! dates and times is all this module does; time zones live in `schedule.rs`.

use std::fmt;

use jiff::civil::{Date, Time};

/// A parsed cron expression. Matches civil (local, zone-free) dates and times.
#[derive(Clone, PartialEq, Eq)]
pub struct CronExpr {
    source: String,
    minutes: u64,
    hours: u32,
    days_of_month: u32,
    months: u16,
    /// Bit 0 = Sunday .. bit 6 = Saturday.
    days_of_week: u8,
    dom_restricted: bool,
    dow_restricted: bool,
}

/// Why a cron expression was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CronError {
    #[error("expected 5 fields (minute hour day-of-month month day-of-week), found {found}")]
    FieldCount { found: usize },
    #[error("{field} field `{text}`: {reason}")]
    Field {
        field: &'static str,
        text: String,
        reason: String,
    },
    #[error("`{expr}` never fires: no month has that day")]
    NeverFires { expr: String },
}

struct FieldSpec {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
}

const MINUTE: FieldSpec = FieldSpec {
    name: "minute",
    min: 0,
    max: 59,
    names: &[],
};
const HOUR: FieldSpec = FieldSpec {
    name: "hour",
    min: 0,
    max: 23,
    names: &[],
};
const DAY_OF_MONTH: FieldSpec = FieldSpec {
    name: "day-of-month",
    min: 1,
    max: 31,
    names: &[],
};
const MONTH: FieldSpec = FieldSpec {
    name: "month",
    min: 1,
    max: 12,
    names: &[
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ],
};
const DAY_OF_WEEK: FieldSpec = FieldSpec {
    name: "day-of-week",
    min: 0,
    max: 7,
    names: &["sun", "mon", "tue", "wed", "thu", "fri", "sat"],
};

/// The longest month length for each month (February may have 29 days).
const MAX_DAYS_IN_MONTH: [u32; 12] = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];

impl CronExpr {
    pub fn parse(expr: &str) -> Result<CronExpr, CronError> {
        let fields: Vec<&str> = expr.split_whitespace().collect();
        let [minute, hour, dom, month, dow] = fields[..] else {
            return Err(CronError::FieldCount {
                found: fields.len(),
            });
        };
        let minutes = parse_field(minute, &MINUTE)?;
        let hours = parse_field(hour, &HOUR)?;
        let days_of_month = parse_field(dom, &DAY_OF_MONTH)?;
        let months = parse_field(month, &MONTH)?;
        let mut dow_bits = parse_field(dow, &DAY_OF_WEEK)?;
        if dow_bits & (1 << 7) != 0 {
            dow_bits = (dow_bits & 0x7f) | 1; // 7 is Sunday too
        }
        let parsed = CronExpr {
            source: fields.join(" "),
            minutes,
            hours: u32::try_from(hours).unwrap_or(u32::MAX),
            days_of_month: u32::try_from(days_of_month).unwrap_or(u32::MAX),
            months: u16::try_from(months).unwrap_or(u16::MAX),
            days_of_week: u8::try_from(dow_bits).unwrap_or(u8::MAX),
            dom_restricted: !dom.starts_with('*'),
            dow_restricted: !dow.starts_with('*'),
        };
        if !parsed.can_fire() {
            return Err(CronError::NeverFires {
                expr: parsed.source,
            });
        }
        Ok(parsed)
    }

    /// The expression as written (whitespace normalised).
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether some day of some year matches. Only a day-of-month that no
    /// selected month has (e.g. `0 0 30 2 *`) can make this false: an OR-ed
    /// day-of-week matches every week, and every date falls on every weekday
    /// within the 28-year cycle.
    fn can_fire(&self) -> bool {
        if self.dom_restricted && self.dow_restricted {
            return true;
        }
        (1..=12u32).any(|m| {
            self.months & (1 << m) != 0
                && (!self.dom_restricted
                    || (1..=MAX_DAYS_IN_MONTH[m as usize - 1])
                        .any(|d| self.days_of_month & (1 << d) != 0))
        })
    }

    /// Whether the expression fires at some time on `date`.
    pub fn matches_date(&self, date: Date) -> bool {
        let month = u32::try_from(date.month()).unwrap_or(0);
        if self.months & (1 << month) == 0 {
            return false;
        }
        let dom = self.days_of_month & (1 << u32::try_from(date.day()).unwrap_or(0)) != 0;
        let dow = self.days_of_week & (1 << date.weekday().to_sunday_zero_offset()) != 0;
        // A field written as `*` has every bit set, so AND leaves the other
        // field in charge; `*/2` still restricts (Vixie cron does the same).
        if self.dom_restricted && self.dow_restricted {
            dom || dow
        } else {
            dom && dow
        }
    }

    /// The times of day the expression fires at, latest first.
    pub fn times_descending(&self) -> impl Iterator<Item = Time> + '_ {
        (0..24i8)
            .rev()
            .filter(move |h| self.hours & (1 << h) != 0)
            .flat_map(move |h| {
                (0..60i8)
                    .rev()
                    .filter(move |m| self.minutes & (1 << m) != 0)
                    .map(move |m| Time::constant(h, m, 0, 0))
            })
    }
}

impl fmt::Debug for CronExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CronExpr({:?})", self.source)
    }
}

impl fmt::Display for CronExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// Parses one field into a bit set (bit n = value n).
fn parse_field(text: &str, spec: &FieldSpec) -> Result<u64, CronError> {
    let err = |reason: String| CronError::Field {
        field: spec.name,
        text: text.to_owned(),
        reason,
    };
    let mut bits = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                let step: u32 = s
                    .parse()
                    .map_err(|_| err(format!("step `{s}` is not a number")))?;
                if step == 0 {
                    return Err(err("step must be at least 1".to_owned()));
                }
                (r, Some(step))
            }
            None => (part, None),
        };
        let (lo, hi) = if range == "*" {
            (spec.min, spec.max)
        } else if let Some((a, b)) = range.split_once('-') {
            let (a, b) = (value(a, spec).map_err(&err)?, value(b, spec).map_err(&err)?);
            if a > b {
                return Err(err(format!("range {a}-{b} runs backwards")));
            }
            (a, b)
        } else {
            let a = value(range, spec).map_err(&err)?;
            // `a/s` means from a to the end of the field.
            (a, if step.is_some() { spec.max } else { a })
        };
        let step = step.unwrap_or(1);
        let mut v = lo;
        while v <= hi {
            bits |= 1 << v;
            v += step;
        }
    }
    Ok(bits)
}

fn value(text: &str, spec: &FieldSpec) -> Result<u32, String> {
    let lower = text.to_ascii_lowercase();
    if let Some(i) = spec.names.iter().position(|n| *n == lower) {
        // Month names count from 1 (the field's min), day names from 0.
        return Ok(spec.min + u32::try_from(i).unwrap_or(0));
    }
    let v: u32 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number or a name"))?;
    if v < spec.min || v > spec.max {
        return Err(format!("{v} is out of range {}-{}", spec.min, spec.max));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::civil::date;

    fn times(e: &CronExpr) -> Vec<String> {
        e.times_descending().map(|t| t.to_string()).collect()
    }

    #[test]
    fn fields_lists_ranges_and_steps() {
        let e = CronExpr::parse("0,30 8-10/2 * * *").expect("valid");
        assert_eq!(times(&e), ["10:30:00", "10:00:00", "08:30:00", "08:00:00"]);
        let e = CronExpr::parse("45/5 23 * * *").expect("valid");
        assert_eq!(times(&e), ["23:55:00", "23:50:00", "23:45:00"]);
    }

    #[test]
    fn names_and_sunday_as_seven() {
        let e = CronExpr::parse("0 19 * * MON-fri").expect("valid");
        assert!(e.matches_date(date(2026, 3, 6))); // a Friday
        assert!(!e.matches_date(date(2026, 3, 7))); // a Saturday
        let e = CronExpr::parse("0 0 * jan,Dec 7").expect("valid");
        assert!(e.matches_date(date(2026, 1, 4))); // a Sunday in January
        assert!(!e.matches_date(date(2026, 1, 5)));
        assert!(!e.matches_date(date(2026, 2, 1))); // a Sunday in February
    }

    #[test]
    fn day_of_month_or_day_of_week_when_both_restricted() {
        let e = CronExpr::parse("0 0 1 * mon").expect("valid");
        assert!(e.matches_date(date(2026, 4, 1))); // the 1st, a Wednesday
        assert!(e.matches_date(date(2026, 4, 6))); // a Monday
        assert!(!e.matches_date(date(2026, 4, 7)));
        let e = CronExpr::parse("0 0 1 * *").expect("valid");
        assert!(!e.matches_date(date(2026, 4, 6)));
        let e = CronExpr::parse("0 0 */2 * mon").expect("valid");
        // `*/2` starts with `*`: AND, as in Vixie cron.
        assert!(!e.matches_date(date(2026, 4, 6))); // Monday the 6th
        assert!(e.matches_date(date(2026, 4, 13))); // Monday the 13th
        assert!(!e.matches_date(date(2026, 4, 15))); // Wednesday the 15th
    }

    #[test]
    fn bad_expressions_say_which_field() {
        assert_eq!(
            CronExpr::parse("0 19 * *"),
            Err(CronError::FieldCount { found: 4 })
        );
        let e = CronExpr::parse("0 24 * * *").expect_err("hour 24");
        assert_eq!(e.to_string(), "hour field `24`: 24 is out of range 0-23");
        let e = CronExpr::parse("0 0 * * fri-mon").expect_err("backwards");
        assert_eq!(
            e.to_string(),
            "day-of-week field `fri-mon`: range 5-1 runs backwards"
        );
        let e = CronExpr::parse("*/0 0 * * *").expect_err("zero step");
        assert_eq!(e.to_string(), "minute field `*/0`: step must be at least 1");
        let e = CronExpr::parse("0 0 30 feb *").expect_err("never");
        assert_eq!(
            e.to_string(),
            "`0 0 30 feb *` never fires: no month has that day"
        );
        assert!(CronExpr::parse("0 0 29 2 *").is_ok(), "leap days exist");
        assert!(
            CronExpr::parse("0 0 30 2 mon").is_ok(),
            "Mondays in February"
        );
    }
}
