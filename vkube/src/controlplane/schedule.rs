//! Sleep windows (`vkube run --sleep-schedule`, `vkube create --sleep-schedule`): `DAYS HH:MM-HH:MM [ZONE]`,
//! e.g. `Mon-Fri 19:00-08:00 Europe/Berlin` (a window may run past midnight: it belongs to the day
//! it starts on), `Sat,Sun 00:00-24:00`, `* 22:00-06:00 UTC`. The zone defaults to UTC.

use std::str::FromStr;

use jiff::civil::{Date, Time, Weekday};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan, Zoned};

#[derive(Clone, Debug)]
pub struct Schedule {
    days: [bool; 7],
    start: Time,
    /// Minutes the window lasts (1..=1440).
    minutes: i64,
    zone: TimeZone,
    text: String,
}

const DAYS: [(&str, Weekday); 7] = [
    ("mon", Weekday::Monday),
    ("tue", Weekday::Tuesday),
    ("wed", Weekday::Wednesday),
    ("thu", Weekday::Thursday),
    ("fri", Weekday::Friday),
    ("sat", Weekday::Saturday),
    ("sun", Weekday::Sunday),
];

fn day(s: &str) -> Result<usize, String> {
    let s = s.to_ascii_lowercase();
    let full = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"];
    DAYS.iter()
        .zip(full)
        .position(|((short, _), long)| s == *short || s == long)
        .ok_or_else(|| format!("{s:?} is not a day (use Mon, Tue, ..., Sun)"))
}

fn hhmm(s: &str) -> Result<i64, String> {
    let (h, m) = s.split_once(':').ok_or_else(|| format!("{s:?} is not HH:MM"))?;
    let (h, m): (i64, i64) =
        (h.parse().map_err(|_| format!("{s:?} is not HH:MM"))?, m.parse().map_err(|_| format!("{s:?} is not HH:MM"))?);
    if !(0..=24).contains(&h) || !(0..60).contains(&m) || (h == 24 && m != 0) {
        return Err(format!("{s:?} is not a time of day"));
    }
    Ok(h * 60 + m)
}

impl FromStr for Schedule {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let usage = "use DAYS HH:MM-HH:MM [ZONE], e.g. \"Mon-Fri 19:00-08:00 Europe/Berlin\"";
        let parts: Vec<&str> = text.split_whitespace().collect();
        let (days_s, window, zone) = match parts.as_slice() {
            [d, w] => (*d, *w, "UTC"),
            [d, w, z] => (*d, *w, *z),
            _ => return Err(format!("sleep schedule {text:?}: {usage}")),
        };
        let err = |e: String| format!("sleep schedule {text:?}: {e}; {usage}");
        let mut days = [false; 7];
        for item in days_s.split(',') {
            match item.split_once('-') {
                _ if item == "*" => days = [true; 7],
                Some((a, b)) => {
                    let (a, b) = (day(a).map_err(err)?, day(b).map_err(err)?);
                    let mut i = a;
                    loop {
                        days[i] = true;
                        if i == b {
                            break;
                        }
                        i = (i + 1) % 7;
                    }
                }
                None => days[day(item).map_err(err)?] = true,
            }
        }
        let (a, b) = window.split_once('-').ok_or_else(|| err(format!("{window:?} is not HH:MM-HH:MM")))?;
        let (a, b) = (hhmm(a).map_err(err)?, hhmm(b).map_err(err)?);
        if a == 1440 {
            return Err(err("a window cannot start at 24:00 (use 00:00)".into()));
        }
        let minutes = if b > a { b - a } else { b + 1440 - a };
        let zone = TimeZone::get(zone).map_err(|e| err(format!("time zone {zone:?}: {e}")))?;
        let start = Time::new((a / 60) as i8 % 24, (a % 60) as i8, 0, 0).map_err(|e| err(e.to_string()))?;
        Ok(Schedule { days, start, minutes, zone, text: text.to_string() })
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl Schedule {
    /// The start of the window `now` is in, if it is in one.
    pub fn window_at(&self, now: Timestamp) -> Option<Timestamp> {
        let local = now.to_zoned(self.zone.clone());
        // The window of today, or of yesterday running past midnight.
        for back in [0, 1] {
            let date: Date = local.date().checked_sub(back.days()).ok()?;
            let weekday = date.weekday().to_monday_zero_offset() as usize;
            if !self.days[weekday] {
                continue;
            }
            let start: Zoned = date.to_datetime(self.start).to_zoned(self.zone.clone()).ok()?;
            let end = start.checked_add(self.minutes.minutes()).ok()?;
            if start.timestamp() <= now && now < end.timestamp() {
                return Some(start.timestamp());
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn weekday_evenings_past_midnight_in_a_zone() {
        let s: Schedule = "Mon-Fri 19:00-08:00 Europe/Berlin".parse().unwrap();
        // 2026-12-03 is a Thursday; Berlin is UTC+1 in December.
        assert_eq!(s.window_at(at("2026-12-03T17:59:00Z")), None);
        assert_eq!(s.window_at(at("2026-12-03T18:00:00Z")), Some(at("2026-12-03T18:00:00Z")));
        assert_eq!(s.window_at(at("2026-12-04T06:59:00Z")), Some(at("2026-12-03T18:00:00Z")), "past midnight");
        assert_eq!(s.window_at(at("2026-12-04T07:00:00Z")), None);
        // Friday's window runs into Saturday morning; none starts on Saturday.
        assert_eq!(s.window_at(at("2026-12-05T06:00:00Z")), Some(at("2026-12-04T18:00:00Z")));
        assert_eq!(s.window_at(at("2026-12-05T20:00:00Z")), None);
    }

    #[test]
    fn whole_days_lists_and_every_day() {
        let s: Schedule = "Sat,Sun 00:00-24:00".parse().unwrap();
        assert_eq!(s.window_at(at("2026-12-05T12:00:00Z")), Some(at("2026-12-05T00:00:00Z")));
        assert_eq!(s.window_at(at("2026-12-04T23:59:00Z")), None);
        let s: Schedule = "* 22:00-06:00 UTC".parse().unwrap();
        assert!(s.window_at(at("2026-12-02T23:00:00Z")).is_some());
        let s: Schedule = "Fri-Mon 10:00-11:00".parse().unwrap();
        assert!(s.window_at(at("2026-12-07T10:30:00Z")).is_some(), "a range across Sunday");
        assert!(s.window_at(at("2026-12-08T10:30:00Z")).is_none());
    }

    #[test]
    fn bad_schedules_say_how_to_write_one() {
        for bad in [
            "",
            "Mon-Fri",
            "Someday 19:00-08:00",
            "Month 19:00-20:00",
            "Mon 24:00-08:00",
            "Mon 25:00-08:00",
            "Mon 19:00-08:00 Mars/Olympus",
        ] {
            let e = bad.parse::<Schedule>().unwrap_err();
            assert!(e.contains("DAYS HH:MM-HH:MM"), "{bad}: {e}");
        }
    }
}
