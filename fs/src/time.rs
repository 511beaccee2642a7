//! Times as people write them (DESIGN §5): RFC 3339 (`2026-11-21T10:15:00Z`,
//! `2026-11-21T10:15:00.123456+01:00`), Unix seconds with an optional fraction (`1763720100`,
//! `1763720100.25`), or an integer with a unit suffix `ms`, `us` or `ns`. All to microseconds
//! since the Unix epoch; finer digits are cut. Never panics, whatever the text. The `@STAMP` of a
//! path component ([`crate::snapshot`]) and the tools' `--at` both use this grammar.

/// Why a time does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{text}` is not a time ({why}); use RFC 3339 (2026-11-21T10:15:00Z) or Unix seconds (1763720100.25)")]
pub struct TimeError {
    text: String,
    why: &'static str,
}

fn fail(text: &str, why: &'static str) -> TimeError {
    TimeError {
        text: text.chars().take(64).collect(),
        why,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(y) => 29,
        _ => 28,
    }
}

/// Digits only, as a number.
fn digits(text: &str, s: &str) -> Result<u64, TimeError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(fail(text, "expected digits"));
    }
    s.parse().map_err(|_| fail(text, "number too large"))
}

/// Microseconds of a fraction's digits (`"25"` → 250000).
fn fraction_us(text: &str, frac: &str) -> Result<u64, TimeError> {
    if frac.is_empty() || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(fail(text, "bad fraction"));
    }
    let mut us = 0u64;
    for (i, b) in frac.bytes().take(6).enumerate() {
        us += u64::from(b - b'0') * 10u64.pow(5 - i as u32);
    }
    Ok(us)
}

/// Parses a time into microseconds since the Unix epoch.
pub fn parse_time_us(text: &str) -> Result<u64, TimeError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(fail(text, "empty"));
    }
    if t.contains('T') || t.contains('t') || (t.len() >= 10 && t.as_bytes().get(4) == Some(&b'-')) {
        return parse_rfc3339(text, t);
    }
    for (suffix, per_us_num, per_us_den) in [("ns", 1u64, 1000u64), ("us", 1, 1), ("ms", 1000, 1)] {
        if let Some(n) = t.strip_suffix(suffix) {
            let n = digits(text, n)?;
            return n
                .checked_mul(per_us_num)
                .map(|x| x / per_us_den)
                .ok_or_else(|| fail(text, "out of range"));
        }
    }
    let (secs, frac) = match t.split_once('.') {
        Some((s, f)) => (s, Some(f)),
        None => (t, None),
    };
    let secs = digits(text, secs)?;
    let frac = frac.map_or(Ok(0), |f| fraction_us(text, f))?;
    secs.checked_mul(1_000_000)
        .and_then(|us| us.checked_add(frac))
        .ok_or_else(|| fail(text, "out of range"))
}

fn parse_rfc3339(text: &str, t: &str) -> Result<u64, TimeError> {
    let bytes = t.as_bytes();
    if bytes.len() < 20 || !t.is_ascii() {
        return Err(fail(text, "too short for RFC 3339"));
    }
    let sep = |i: usize, c: &[u8]| bytes.get(i).is_some_and(|b| c.contains(b));
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt ") && sep(13, b":") && sep(16, b":")) {
        return Err(fail(text, "expected YYYY-MM-DDTHH:MM:SS"));
    }
    let year = digits(text, &t[0..4])? as i64;
    let month = digits(text, &t[5..7])? as u32;
    let day = digits(text, &t[8..10])? as u32;
    let hour = digits(text, &t[11..13])?;
    let minute = digits(text, &t[14..16])?;
    let second = digits(text, &t[17..19])?;
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return Err(fail(text, "no such date"));
    }
    if hour > 23 || minute > 59 || second > 60 {
        return Err(fail(text, "no such time of day"));
    }
    let mut rest = &t[19..];
    let mut frac_us = 0;
    if let Some(r) = rest.strip_prefix('.') {
        let end = r.find(|c: char| !c.is_ascii_digit()).unwrap_or(r.len());
        frac_us = fraction_us(text, &r[..end])?;
        rest = &r[end..];
    }
    let offset_s: i64 = match rest {
        "Z" | "z" => 0,
        _ => {
            let b = rest.as_bytes();
            if b.len() != 6 || !matches!(b[0], b'+' | b'-') || b[3] != b':' {
                return Err(fail(text, "expected Z or an offset ±HH:MM"));
            }
            let h = digits(text, &rest[1..3])? as i64;
            let m = digits(text, &rest[4..6])? as i64;
            if h > 23 || m > 59 {
                return Err(fail(text, "bad offset"));
            }
            let s = (h * 60 + m) * 60;
            if b[0] == b'-' {
                -s
            } else {
                s
            }
        }
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + (hour * 3600 + minute * 60 + second.min(59)) as i64 - offset_s;
    if secs < 0 {
        return Err(fail(text, "before 1970"));
    }
    Ok(secs as u64 * 1_000_000 + frac_us)
}

/// RFC 3339 in UTC with microseconds: `2026-11-21T10:15:00.123456Z`.
pub fn format_rfc3339(us: u64) -> String {
    let secs = (us / 1_000_000) as i64;
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}Z",
        s / 3600,
        s % 3600 / 60,
        s % 60,
        us % 1_000_000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_rfc3339_and_unix_seconds_agree() {
        let t = 1_763_720_100_000_000;
        assert_eq!(parse_time_us("2025-11-21T10:15:00Z"), Ok(t));
        assert_eq!(parse_time_us("2025-11-21T11:15:00+01:00"), Ok(t));
        assert_eq!(parse_time_us("2025-11-21T09:15:00-01:00"), Ok(t));
        assert_eq!(parse_time_us("1763720100"), Ok(t));
        assert_eq!(parse_time_us("1763720100.25"), Ok(t + 250_000));
        assert_eq!(parse_time_us("2025-11-21T10:15:00.25Z"), Ok(t + 250_000));
        assert_eq!(
            parse_time_us("2025-11-21T10:15:00.123456789Z"),
            Ok(t + 123_456)
        );
        assert_eq!(parse_time_us("1763720100000ms"), Ok(t));
        assert_eq!(parse_time_us("1763720100000000us"), Ok(t));
        assert_eq!(parse_time_us("1763720100000000000ns"), Ok(t));
        assert_eq!(parse_time_us("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse_time_us("2024-02-29T00:00:00Z").map(|_| ()), Ok(()));
    }

    #[test]
    fn time_formats_back_to_the_same_instant() {
        for us in [
            0,
            1_763_720_100_123_456,
            951_782_400_000_000,
            4_102_444_800_000_001,
        ] {
            assert_eq!(parse_time_us(&format_rfc3339(us)), Ok(us), "{us}");
        }
    }

    #[test]
    fn time_nonsense_is_an_error_never_a_panic() {
        for bad in [
            "",
            " ",
            "x",
            "12x",
            "1.",
            ".5",
            "1.2.3",
            "-5",
            "2025-13-01T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2025-11-21T24:00:00Z",
            "2025-11-21T10:15:00",
            "2025-11-21T10:15:00+1:00",
            "2025-11-21T10:15:00.Z",
            "99999999999999999999",
            "18446744073709551615ms",
            "2025-11-21T10:15:00Zjunk",
            "ms",
            "1e9",
            "2025-11-21T10:15:0é00Z",
            "1969-12-31T23:59:59Z",
            "2025-11-21Tab:cd:efZ",
        ] {
            assert!(parse_time_us(bad).is_err(), "{bad:?} was accepted");
        }
        // Every prefix of a valid time, byte by byte, parses or fails cleanly.
        let good = "2025-11-21T10:15:00.123456+01:00";
        for i in 0..good.len() {
            let _ = parse_time_us(&good[..i]);
        }
    }
}
