//! Times for `--since`/`--until`: RFC 3339 as the API takes it, or an age like `2h`.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{CliError, Result};

/// Milliseconds since the epoch as RFC 3339 UTC with milliseconds, the API's own form.
pub fn format_millis(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ms % 1000
    )
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 to a proleptic Gregorian date.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

pub fn now_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// `--since`/`--until`: an age (`90s`, `15m`, `2h`, `7d`) is that long before `now_ms`;
/// anything else goes to the server as written, which checks it is RFC 3339.
pub fn since(value: &str, now_ms: u64) -> Result<String> {
    let value = value.trim();
    let split = value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len());
    let (digits, unit) = value.split_at(split);
    let unit_ms: u64 = match unit {
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Ok(value.to_owned()),
    };
    let amount: u64 = digits
        .parse()
        .map_err(|_| CliError::usage(format!("`{value}` is neither RFC 3339 nor an age like 2h")))?;
    let ago = amount
        .checked_mul(unit_ms)
        .filter(|ago| *ago <= now_ms)
        .ok_or_else(|| CliError::usage(format!("`{value}` reaches before 1970")))?;
    Ok(format_millis(now_ms - ago))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_the_api() {
        assert_eq!(format_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_millis(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(format_millis(1_796_636_400_700), "2026-12-07T09:40:00.700Z");
    }

    #[test]
    fn ages_count_back_from_now_and_the_rest_passes_through() {
        let now = 1_796_636_400_700;
        assert_eq!(since("2h", now).unwrap(), "2026-12-07T07:40:00.700Z");
        assert_eq!(since("90s", now).unwrap(), "2026-12-07T09:38:30.700Z");
        assert_eq!(since("1d", now).unwrap(), "2026-12-06T09:40:00.700Z");
        assert_eq!(since("2026-12-01T00:00:00Z", now).unwrap(), "2026-12-01T00:00:00Z");
        assert_eq!(since("h", now).unwrap_err().code, "usage");
        assert_eq!(since("99999999999d", now).unwrap_err().code, "usage");
    }
}
