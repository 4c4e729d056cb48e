//! C `strftime` for a UTC instant: the `strftime_now(format)` global of chat templates (Llama 3.x prints the date
//! with it).
//!
//! transformers calls Python's `datetime.now().strftime(format)`, i.e. the machine's local time; servers run in UTC
//! as a rule and there is no time-zone database here, so this uses UTC. Directives are glibc's, including the `-`
//! flag (`%-d`: no padding); unknown ones are copied as they are.

use std::fmt::Write as _;

const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// A UTC calendar time broken into fields.
struct CivilTime {
    year: i64,
    month: u32, // 1..=12
    day: u32,   // 1..=31
    hour: u32,
    minute: u32,
    second: u32,
    weekday: usize,   // 0 = Monday
    day_of_year: u32, // 1..=366
}

impl CivilTime {
    fn from_unix(unix_seconds: i64) -> Self {
        let days = unix_seconds.div_euclid(86_400);
        let secs = unix_seconds.rem_euclid(86_400) as u32;
        // Howard Hinnant's days-to-civil algorithm (proleptic Gregorian calendar)
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
        const BEFORE_MONTH: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
        let day_of_year = BEFORE_MONTH[month as usize - 1] + day + u32::from(leap && month > 2);
        CivilTime {
            year,
            month,
            day,
            hour: secs / 3_600,
            minute: secs / 60 % 60,
            second: secs % 60,
            weekday: (days + 3).rem_euclid(7) as usize, // 1970-01-01 was a Thursday
            day_of_year,
        }
    }
}

/// C `strftime` for a UTC instant, with glibc's `-` flag (`%-d`: no padding). Unknown directives are copied as
/// they are. `%Z` and `%z` are empty, as for the naive `datetime.now()` HF formats.
pub(crate) fn strftime_utc(format: &str, unix_seconds: i64) -> String {
    let t = CivilTime::from_unix(unix_seconds);
    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let unpadded = chars.peek() == Some(&'-');
        if unpadded {
            chars.next();
        }
        let Some(directive) = chars.next() else {
            out.push('%');
            if unpadded {
                out.push('-');
            }
            break;
        };
        let num = |out: &mut String, n: i64, width: usize, pad: char| {
            if unpadded {
                let _ = write!(out, "{n}");
            } else if pad == ' ' {
                let _ = write!(out, "{n:>width$}");
            } else {
                let _ = write!(out, "{n:0width$}");
            }
        };
        let hour12 = match t.hour % 12 {
            0 => 12,
            h => h,
        };
        match directive {
            'a' => out.push_str(&WEEKDAYS[t.weekday][..3]),
            'A' => out.push_str(WEEKDAYS[t.weekday]),
            'b' | 'h' => out.push_str(&MONTHS[t.month as usize - 1][..3]),
            'B' => out.push_str(MONTHS[t.month as usize - 1]),
            'd' => num(&mut out, t.day.into(), 2, '0'),
            'e' => num(&mut out, t.day.into(), 2, ' '),
            'H' => num(&mut out, t.hour.into(), 2, '0'),
            'I' => num(&mut out, hour12.into(), 2, '0'),
            'j' => num(&mut out, t.day_of_year.into(), 3, '0'),
            'm' => num(&mut out, t.month.into(), 2, '0'),
            'M' => num(&mut out, t.minute.into(), 2, '0'),
            'S' => num(&mut out, t.second.into(), 2, '0'),
            'y' => num(&mut out, t.year.rem_euclid(100), 2, '0'),
            'Y' => {
                let _ = write!(out, "{}", t.year);
            }
            'p' => out.push_str(if t.hour < 12 { "AM" } else { "PM" }),
            'u' => num(&mut out, t.weekday as i64 + 1, 1, '0'),
            'w' => num(&mut out, (t.weekday as i64 + 1) % 7, 1, '0'),
            'F' => {
                let _ = write!(out, "{}-{:02}-{:02}", t.year, t.month, t.day);
            }
            'T' => {
                let _ = write!(out, "{:02}:{:02}:{:02}", t.hour, t.minute, t.second);
            }
            'R' => {
                let _ = write!(out, "{:02}:{:02}", t.hour, t.minute);
            }
            'D' => {
                let _ = write!(
                    out,
                    "{:02}/{:02}/{:02}",
                    t.month,
                    t.day,
                    t.year.rem_euclid(100)
                );
            }
            'Z' | 'z' => {}
            'n' => out.push('\n'),
            't' => out.push('\t'),
            '%' => out.push('%'),
            other => {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
                out.push(other);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_utc_fields() {
        // 2024-02-29 00:00:00 UTC, a Thursday; day 60 of a leap year
        let t = 1_709_164_800;
        assert_eq!(
            strftime_utc("%Y-%m-%d %H:%M:%S %a %j", t),
            "2024-02-29 00:00:00 Thu 060"
        );
        assert_eq!(strftime_utc("%I %p %-I %e|%Q%", t), "12 AM 12 29|%Q%");
        // before the epoch
        assert_eq!(
            strftime_utc("%F %T %A", -1),
            "1969-12-31 23:59:59 Wednesday"
        );
    }
}
