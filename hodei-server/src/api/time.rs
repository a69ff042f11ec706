//! Journal times (Unix milliseconds) as RFC 3339 text in UTC, and back: the API's one time
//! format, without a calendar library for two conversions.

/// `2026-12-07T09:30:00.125Z`.
pub(crate) fn format_millis(millis: u64) -> String {
    hodei_core::Timestamp(millis).to_rfc3339()
}

/// Reads `YYYY-MM-DDTHH:MM:SS[.fff][Z|±HH:MM]` (a date alone means its midnight, UTC) as Unix
/// milliseconds. Times before 1970 are refused: no journal has them.
pub(crate) fn parse_millis(text: &str) -> Result<u64, String> {
    let bad = || format!("{text:?} is not an RFC 3339 time (like 2026-12-07T09:30:00Z)");
    let number = |s: &str| -> Result<i64, String> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        s.parse().map_err(|_| bad())
    };
    let (date, time) = match text.split_once(['T', 't', ' ']) {
        Some((d, t)) => (d, Some(t)),
        None => (text, None),
    };
    let mut parts = date.splitn(3, '-');
    let (y, m, d) = match (parts.next(), parts.next(), parts.next()) {
        (Some(y), Some(m), Some(d)) if y.len() == 4 && m.len() == 2 && d.len() == 2 => {
            (number(y)?, number(m)?, number(d)?)
        }
        _ => return Err(bad()),
    };
    if !(1..=12).contains(&m) || !(1..=days_in_month(y, m)).contains(&d) {
        return Err(bad());
    }
    let mut millis = days_from_civil(y, m, d) * 86_400_000;
    if let Some(time) = time {
        let (clock, offset_minutes) = if let Some(clock) = time.strip_suffix(['Z', 'z']) {
            (clock, 0)
        } else if let Some(at) = time.rfind(['+', '-']) {
            let (clock, offset) = time.split_at(at);
            let sign = if offset.starts_with('-') { -1 } else { 1 };
            let (h, min) = offset[1..].split_once(':').ok_or_else(bad)?;
            let (h, min) = (number(h)?, number(min)?);
            if h > 23 || min > 59 {
                return Err(bad());
            }
            (clock, sign * (h * 60 + min))
        } else {
            return Err(bad());
        };
        let (hms, fraction) = match clock.split_once('.') {
            Some((hms, f)) => (hms, Some(f)),
            None => (clock, None),
        };
        let mut fields = hms.splitn(3, ':');
        let (h, min, s) = match (fields.next(), fields.next(), fields.next()) {
            (Some(h), Some(min), Some(s)) if h.len() == 2 && min.len() == 2 && s.len() == 2 => {
                (number(h)?, number(min)?, number(s)?)
            }
            _ => return Err(bad()),
        };
        if h > 23 || min > 59 || s > 60 {
            return Err(bad());
        }
        let fraction_millis = match fraction {
            Some(f) => {
                let digits = number(f)?;
                let len = u32::try_from(f.len()).map_err(|_| bad())?;
                // Milliseconds: more digits are cut, fewer scaled up.
                if len >= 3 { number(&f[..3])? } else { digits * 10i64.pow(3 - len) }
            }
            None => 0,
        };
        millis += ((h * 60 + min - offset_minutes) * 60 + s) * 1000 + fraction_millis;
    }
    u64::try_from(millis).map_err(|_| format!("{text:?} is before 1970"))
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

// Howard Hinnant's days_from_civil (public domain); the other way is `Timestamp::to_rfc3339`.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_instants_format_and_parse_back() {
        // `date -u -d @1796526931.669 +%FT%T.%3NZ`
        assert_eq!(format_millis(1_796_526_931_669), "2026-12-06T03:15:31.669Z");
        assert_eq!(format_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_millis(951_782_400_000), "2000-02-29T00:00:00.000Z");
        for millis in [0, 951_782_400_000, 1_796_526_931_669, 4_102_444_799_999] {
            assert_eq!(parse_millis(&format_millis(millis)), Ok(millis));
        }
    }

    #[test]
    fn offsets_dates_and_fractions_are_read() {
        assert_eq!(parse_millis("2026-12-06T04:15:31.669+01:00"), Ok(1_796_526_931_669));
        assert_eq!(parse_millis("2026-12-06T02:15:31.6-01:00"), Ok(1_796_526_931_600));
        assert_eq!(parse_millis("2026-12-06"), Ok(1_796_515_200_000));
        assert_eq!(parse_millis("2026-12-06T03:15:31.669123Z"), Ok(1_796_526_931_669));
    }

    #[test]
    fn malformed_times_are_refused_with_the_text() {
        for bad in [
            "",
            "yesterday",
            "2026-13-01",
            "2026-02-30",
            "2026-12-06T25:00:00Z",
            "2026-12-06T00:00Z",
            "1969-12-31T23:59:59Z",
            "2026-12-06T00:00:00",
            "２０２６-12-06",
        ] {
            let error = parse_millis(bad).unwrap_err();
            assert!(error.contains("RFC 3339") || error.contains("before 1970"), "{bad}: {error}");
        }
    }
}
